#!/usr/bin/env bash
# Installs node-llama-cpp (prebuilt llama.cpp for linux-x64 CPU, no compiler, ~20 s) into
# tests/llama_cpp/node_modules, once. tests/publish_llama_cpp.rs runs this when needed;
# running it by hand is the same. Needs node >= 20 and npm with access to the npm registry.
set -euo pipefail
cd "$(dirname "$0")"
stamp=node_modules/.jobd-installed
want="$(cat package.json)"
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
command -v node >/dev/null || { echo "install.sh: node is not installed" >&2; exit 1; }
command -v npm >/dev/null || { echo "install.sh: npm is not installed" >&2; exit 1; }
# Several test processes may call this at once: one installs, the others wait.
exec 9>.install.lock
flock 9
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
# --omit=optional skips node-llama-cpp's CUDA/Vulkan/macOS/Windows builds; the linux-x64 CPU
# build is a direct dependency. Its postinstall is not needed with build: "never".
npm install --omit=optional --ignore-scripts --no-audit --no-fund >&2
node -e 'import("node-llama-cpp").then(() => process.exit(0))'
printf '%s' "$want" > "$stamp"
