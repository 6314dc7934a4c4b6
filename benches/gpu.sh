#!/usr/bin/env bash
# Issue 9's GPU checks and comparison, for the lent H100/H200 machine (no Rust there; it has
# PyTorch under /opt/torch/.venv). Uses the Candle benchmark built here by
# benches/build-gpu.sh into target/gpu-bench. In order of what matters most, so that a run cut
# short still answers the issue's targets:
#   1. `--check`: every fused CUDA op (values and gradients, f32, bf16 and f16) and one whole
#      model step with AdamW against the plain ops on the CPU;
#   2. benches/compare.py on the ~100M config (hidden 768, 14 layers, 12 heads, MLP 2048,
#      vocab 1024, batch 16 x 512, AdamW): one table with tokens/s, step split, peak GPU
#      memory (and the VRAM estimate for Candle's runs), MFU, the ratios, and the issue's
#      targets met or not. The targets' pairs run first: Candle f32 (the trainer's step: the
#      fused ops without an autograd graph) and PyTorch + transformers eager, Candle bf16 and
#      PyTorch bf16 autocast SDPA; then PyTorch SDPA, Candle and PyTorch TF32, and with
#      AUTOGRAD=1 (default) Candle f32 / bf16 through autograd (LoRA's path, and full
#      fine-tuning's before the op-level step), then with attention's whole T×S products
#      (candle-unblocked: before causal block skipping);
#   3. each op's time per step in Candle f32 and PyTorch eager;
#   4. when jobd and jobctl were carried too (E2E=0 skips it): the NVML inventory (`jobd gpus`)
#      and jobs/tiny.toml end to end on the GPU through the daemon (placement, CUDA worker,
#      publish, held-out answers), then LoRA in bf16 with checkpointing on its output, then the
#      tiny job again in f16 with checkpointing, and as a Qwen3 (query/key norms) in bf16;
#   5. long context: LoRA at batch 2 x 4096 with and without causal blocks (peak memory).
# The run keeps to BUDGET_S seconds (default 450): compare.py starts no trainer that would end
# past its share, a section that no longer fits says so and is skipped, and every command has
# a timeout. SECONDS_EACH (default 8) is each compared run's measured time, REPEAT (default 1)
# how many times each runs. VARIANTS=...,f16,pt-f16 adds Candle and PyTorch (autocast +
# GradScaler) in f16; VARIANTS=...,candle-lora adds Candle LoRA r16 in bf16 (direct and, with
# AUTOGRAD=1, autograd). ARCH=qwen3 runs sections 2-3 at the same sizes as a Qwen3 (per-head
# query/key norms; PyTorch's Qwen3ForCausalLM). Logs go to $OUT when the device tool sets it (gpu.log: all output). It
# ends with a summary: the check's verdict, the table, the targets, the end-to-end answers,
# the long-context peaks and what was skipped (the device tool returns only the output's tail).
# With the device tool:  run(command="bash benches/gpu.sh", carry=["target/gpu-bench"],
#                            timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${SECONDS_EACH:-8}
ARCH=${ARCH:-llama}
BUDGET_S=${BUDGET_S:-450}
T0=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - T0))); }
# section NAME NEEDS: prints the section's heading and succeeds when NEEDS seconds of the
# budget are left; otherwise says it is skipped.
section() {
  local l; l=$(left)
  if [ "$l" -lt "$2" ]; then echo "== $1: skipped, ${l} s of BUDGET_S left (needs ~$2 s)"; return 1; fi
  echo "== $1 (${l} s of BUDGET_S left)"
}
# cap S: S, or what is left of the budget if that is less (at least 10 s).
cap() { local l; l=$(left); [ "$l" -lt 10 ] && l=10; echo $(($1 < l ? $1 : l)); }
TORCH_PY=${TORCH_PY:-/opt/torch/.venv/bin/python}
LOGS=${OUT:-target/gpu-logs}
mkdir -p "$LOGS"
# Everything also goes to gpu.log, which the summary at the end reads.
exec > >(tee "$LOGS/gpu.log") 2>&1
TEE=$!
BIN=target/gpu-bench/train_throughput
for f in target/gpu-bench/*.gz; do [ -e "$f" ] && gunzip -kf "$f"; done
chmod +x target/gpu-bench/* 2>/dev/null
[ -x "$BIN" ] || { echo "gpu.sh: $BIN missing: build it with benches/build-gpu.sh and carry target/gpu-bench" >&2; exit 2; }
# cuBLAS/cuRAND/nvrtc come from PyTorch's environment; libcudart.so.13 from the carried folder.
CU13=$("$TORCH_PY" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH=$PWD/target/gpu-bench${CU13:+:$CU13}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true

# Section 4, the product end to end on the GPU: the daemon finds the GPU through NVML, places
# jobs/tiny.toml with `gpus = 1` on it, and its worker trains with CUDA. Workers start with a
# cleared environment, so the CUDA libraries are registered as a CUDA install would be.
end_to_end() {
  J=$PWD/target/gpu-bench
  { echo "$J"; [ -n "$CU13" ] && echo "$CU13"; } > /etc/ld.so.conf.d/jobd-gpu-check.conf && ldconfig
  "$J/jobd" gpus 2>&1 | head -20
  S=/tmp/jobd-gpu; rm -rf "$S"; mkdir -p "$S/ollama/models"
  "$J/jobd" --state-dir "$S" --ollama-models "$S/ollama/models" 2>"$S/jobd.log" &
  DAEMON=$!
  export JOBD_URL=$S/jobd.sock
  for _ in $(seq 100); do [ -S "$JOBD_URL" ] && break; sleep 0.1; done
  { cat jobs/tiny.toml; printf '\n[resources]\ngpus = 1\n'; } > jobs/tiny-gpu.toml
  timeout "$(cap 90)" "$J/jobctl" submit --follow jobs/tiny-gpu.toml 2>&1 | tail -12
  ID=$("$J/jobctl" list --all --json | sed -n 's/.*"id": *\([0-9]*\).*/\1/p' | head -1)
  "$J/jobctl" show "$ID" 2>&1 | head -30
  grep -h -i "cuda\|training step\|device" "$S/jobs/$ID/stderr.log" 2>/dev/null | head -5
  # The first 8 held-out prompts of the tiny task, answered by the model in $1.
  held_out() {
    local right=0 total=0 line prompt want got
    while IFS= read -r line; do
      prompt=$(printf '%s' "$line" | sed 's/.*"prompt": *"\([^"]*\)".*/\1/')
      want=$(printf '%s' "$line" | sed 's/.*"completion": *"\([^"]*\)".*/\1/')
      got=$("$J/jobd" generate --model "$1" --prompt "$prompt" --max-tokens 5 2>/dev/null | head -c ${#want})
      total=$((total + 1)); [ "$got" = "$want" ] && right=$((right + 1))
    done < <(head -n 8 jobs/data/tiny_eval.jsonl)
    echo "$right of $total"
  }
  echo "held-out prompts right: $(held_out "$S/jobs/$ID/output")"
  # LoRA in bf16 on the trained model: frozen base in bf16, adapters on every projection with
  # dropout (masks drawn on the GPU), activation checkpointing, merged and published.
  echo "== end to end: LoRA (bf16, checkpointing) on the tiny model, on the GPU"
  cat > jobs/tiny-lora-gpu.toml <<EOF
name = "tiny-lora"
kind = "train"
[model]
base = "$S/jobs/$ID/output"
[data]
train_file = "data/tiny_train.jsonl"
eval_file = "data/tiny_eval.jsonl"
block_size = 16
[training]
max_steps = 40
per_device_train_batch_size = 16
learning_rate = 5e-4
logging_steps = 10
save_steps = 20
gradient_checkpointing = true
dtype = "bf16"
[lora]
r = 4
lora_alpha = 8
lora_dropout = 0.1
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[resources]
gpus = 1
[publish]
ollama_name = "jobd/tiny-lora:latest"
EOF
  timeout "$(cap 90)" "$J/jobctl" submit --follow jobs/tiny-lora-gpu.toml 2>&1 | tail -6
  LID=$((ID + 1))
  grep -h "training step\|device=" "$S/jobs/$LID/stderr.log" 2>/dev/null | head -3
  echo "merged LoRA model, held-out prompts right: $(held_out "$S/jobs/$LID/output")"
  cp "$S/jobs/$LID/stderr.log" "$LOGS/worker-lora.log" 2>/dev/null
  # The same tiny job in f16 (dynamic loss scaling) with activation checkpointing: the trainer's
  # op-level step on the f16 kernels, end to end.
  echo "== end to end: the tiny job in f16 with checkpointing, on the GPU"
  sed -e 's/^name = "tiny-shift"/name = "tiny-shift-f16"/' \
      -e 's/^\[training\]/[training]\ndtype = "f16"\ngradient_checkpointing = true/' \
      -e 's#jobd/tiny-shift:latest#jobd/tiny-shift-f16:latest#' jobs/tiny-gpu.toml > jobs/tiny-f16-gpu.toml
  timeout "$(cap 90)" "$J/jobctl" submit --follow jobs/tiny-f16-gpu.toml 2>&1 | tail -6
  FID=$((ID + 2))
  grep -h "training step\|overflowed\|device=" "$S/jobs/$FID/stderr.log" 2>/dev/null | head -4
  echo "f16 model, held-out prompts right: $(held_out "$S/jobs/$FID/output")"
  cp "$S/jobs/$FID/stderr.log" "$LOGS/worker-f16.log" 2>/dev/null
  # The tiny job as a Qwen3 (per-head query/key norms, on the GPU's RMSNorm kernels in rows
  # of head_dim) in bf16: trained, published as llama.cpp's qwen3, answering.
  echo "== end to end: the tiny job as a Qwen3 in bf16, on the GPU"
  sed -e 's/^name = "tiny-shift"/name = "tiny-shift-qwen3"/' \
      -e 's/^\[model\]/[model]\nqk_norm = true/' \
      -e 's/^\[training\]/[training]\ndtype = "bf16"/' \
      -e 's#jobd/tiny-shift:latest#jobd/tiny-shift-qwen3:latest#' jobs/tiny-gpu.toml > jobs/tiny-qwen3-gpu.toml
  timeout "$(cap 60)" "$J/jobctl" submit --follow jobs/tiny-qwen3-gpu.toml 2>&1 | tail -4
  QID=$((ID + 3))
  grep -h "training step\|device=" "$S/jobs/$QID/stderr.log" 2>/dev/null | head -3
  echo "qwen3 model, held-out prompts right: $(held_out "$S/jobs/$QID/output")"
  cp "$S/jobs/$QID/stderr.log" "$LOGS/worker-qwen3.log" 2>/dev/null
  "$J/jobctl" models 2>&1 | head -6
  cp "$S/jobd.log" "$LOGS/jobd.log" 2>/dev/null; cp "$S/jobs/$ID/stderr.log" "$LOGS/worker.log" 2>/dev/null
  kill $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null
  rm -f /etc/ld.so.conf.d/jobd-gpu-check.conf jobs/tiny-gpu.toml jobs/tiny-lora-gpu.toml \
    jobs/tiny-f16-gpu.toml jobs/tiny-qwen3-gpu.toml; ldconfig
}

echo "== 1. fused CUDA ops and one model step against the CPU's plain ops"
timeout "$(cap 150)" "$BIN" --bench --check --device cuda 2>&1 | tee "$LOGS/check.log"
echo "check exit: ${PIPESTATUS[0]}"

# Sections 3-5 keep ~170 s for themselves and compare.py gets the rest; when that would leave
# it under 80 s, the targets come first and it gets all that is left.
if section "2. training throughput, ~100M config" 60; then
  CB=$(($(left) - 170)); [ "$CB" -lt 80 ] && CB=$(left)
  PYTHONUNBUFFERED=1 timeout "$(cap 420)" "$TORCH_PY" benches/compare.py --device cuda --config 100m --arch "$ARCH" \
    --seconds "$SECONDS_EACH" --repeat "${REPEAT:-1}" --candle-bin "$BIN" --python "$TORCH_PY" \
    --budget "$CB" $([ "${AUTOGRAD:-1}" = 1 ] && echo --autograd) \
    --variants "${VARIANTS:-f32,eager,bf16,pt-bf16,sdpa,candle-tf32,tf32,candle-unblocked}" 2>&1 \
    | tee "$LOGS/compare.log" | grep -v "^step "
fi

# Where a step's time goes, op by op: Candle's op-level step (CUDA events around each op) and
# PyTorch eager (torch.profiler), both f32, the pair whose ratio is issue 9's open target.
if section "3. op times per step, 100m f32: Candle, then PyTorch eager" 45; then
  timeout "$(cap 60)" "$BIN" --bench --config 100m --arch "$ARCH" --dtype f32 --device cuda --seconds 3 --op-times 2>&1 \
    | grep -v "^step "
  JOBD_BENCH_PYTHON="$TORCH_PY" PYTHONUNBUFFERED=1 timeout "$(cap 90)" "$TORCH_PY" benches/pytorch_train.py --config 100m --arch "$ARCH" \
    --variant eager --device cuda --seconds 3 --op-times 2>&1 | grep -v "^step "
fi

if [ "${E2E:-1}" = 1 ] && [ -x target/gpu-bench/jobd ] && [ -x target/gpu-bench/jobctl ] \
  && section "4. end to end: jobd + jobctl, the tiny job on the GPU" 105; then
  end_to_end
fi

# Long context, where attention's T×S buffers dominate: LoRA r16 in bf16 at batch 2 x 4096,
# attention's whole T×S products and buffers vs one causal block of rows at a time; the
# measured peak beside the VRAM estimate the scheduler reserves.
if section "5. long context: 100m, LoRA r16, bf16, batch 2 x 4096" 25; then
  for rows in 0 auto; do
    timeout "$(cap 60)" "$BIN" --bench --config 100m --batch 2 --seq 4096 --dtype bf16 --lora 16 \
      --device cuda --seconds 4 $([ "$rows" = 0 ] && echo --attention-block-rows 0) 2>&1 \
      | grep -v "^step " | tail -1 | sed "s/^/attention rows per block: $rows  /"
  done
fi
# The lines a note needs, together at the end (the device tool returns only the output's tail).
echo "== summary"
grep -h "^check:" "$LOGS/check.log" 2>/dev/null || echo "check: no result"
sed -n '/^config 100m/,/^(÷ columns/p' "$LOGS/compare.log" 2>/dev/null
sed -n '/^peak memory of/p; /^issue 9 targets/,$p' "$LOGS/compare.log" 2>/dev/null
grep -h "held-out prompts right\|: skipped, \|^attention rows per block" "$LOGS/gpu.log" 2>/dev/null
echo "gpu.sh: done in $((SECONDS - T0)) s of BUDGET_S=$BUDGET_S"
# Let tee write the last lines before the script ends.
exec >&- 2>&-
wait "$TEE" 2>/dev/null
