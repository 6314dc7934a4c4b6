#!/usr/bin/env bash
# The main job on embedded defaults: builds jobd, starts the daemon with its state in
# ./.jobd-demo, submits jobs/tiny.toml (a tiny llama trained from scratch on the CPU, ~1 min),
# follows it to the end, publishes it into a local Ollama models directory, and asks the
# trained model held-out questions with `jobd generate`. Stops the daemon at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --bins
BIN="$PWD/target/debug"
STATE="${JOBD_DEMO_DIR:-$PWD/.jobd-demo}"
rm -rf "$STATE"
mkdir -p "$STATE/ollama/models"

echo "== starting jobd (state in $STATE, log in $STATE/jobd.log)"
"$BIN/jobd" --state-dir "$STATE" --ollama-models "$STATE/ollama/models" 2>"$STATE/jobd.log" &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null || true; wait $DAEMON 2>/dev/null || true' EXIT
export JOBD_URL="$STATE/jobd.sock"
for _ in $(seq 100); do [ -S "$JOBD_URL" ] && break; sleep 0.1; done
"$BIN/jobctl" gpus || true

echo "== submitting jobs/tiny.toml"
"$BIN/jobctl" submit --follow jobs/tiny.toml
ID=$("$BIN/jobctl" list --all --json | sed -n 's/.*"id": *\([0-9]*\).*/\1/p' | head -1)
"$BIN/jobctl" show "$ID"

echo "== the trained model on held-out prompts (never seen in training)"
OUT="$STATE/jobs/$ID/output"
right=0; total=0
while IFS= read -r line; do
  prompt=$(printf '%s' "$line" | sed 's/.*"prompt": *"\([^"]*\)".*/\1/')
  want=$(printf '%s' "$line" | sed 's/.*"completion": *"\([^"]*\)".*/\1/')
  got=$("$BIN/jobd" generate --model "$OUT" --prompt "$prompt" --max-tokens 5 | head -c ${#want})
  total=$((total + 1)); [ "$got" = "$want" ] && right=$((right + 1))
  printf '  %-18s -> %-10s (expected %s)\n' "$prompt" "$got" "$want"
done < <(head -n 8 jobs/data/tiny_eval.jsonl)
echo "  $right of $total correct"

echo "== the Ollama store"
"$BIN/jobctl" models
echo "Point Ollama at it to run the model: OLLAMA_MODELS=$STATE/ollama/models ollama serve, then ollama run jobd/tiny-shift"
