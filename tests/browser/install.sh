#!/usr/bin/env bash
# Installs what the dashboard's browser tests need, once: Debian's Chromium (+ ChromeDriver)
# with apt-get when /usr/bin/chromium is missing, and playwright-core (pinned in package.json,
# locked in package-lock.json; it drives the installed Chromium, it never downloads a browser)
# into tests/browser/node_modules. scripts/test.sh runs it; tests/it/dashboard.rs runs it too
# when something is missing, so `cargo test` alone works on a machine that can install.
# Several callers may run it at once: one installs, the others wait on the lock.
set -euo pipefail
cd "$(dirname "$0")"
exec 9>.install.lock
flock 9

if [[ ! -x /usr/bin/chromium ]]; then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "install.sh: /usr/bin/chromium is missing and apt-get cannot run here (not root?)" >&2
        exit 1
    fi
    echo "install.sh: installing Debian's chromium and chromium-driver" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >&2
fi

stamp=node_modules/.jobd-installed
want="$(cat package.json package-lock.json)"
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
command -v npm >/dev/null || { echo "install.sh: npm is not installed" >&2; exit 1; }
npm ci --ignore-scripts --no-audit --no-fund >&2
node -e 'import("playwright-core").then(() => process.exit(0))'
printf '%s' "$want" > "$stamp"
