#!/usr/bin/env bash
# Issue 9's GPU comparison, for the lent H100/H200 machine (no Rust there; it has PyTorch under
# /opt/torch/.venv). Runs the carried Candle benchmark (built here by benches/build-gpu.sh into
# target/gpu-bench) and PyTorch + transformers side by side on the ~100M config (hidden 768,
# 14 layers, 12 heads, MLP 2048, vocab 1024, batch 16 x 512, AdamW) and prints one table:
# tokens/s, data/forward/backward/optimizer split, peak GPU memory, MFU and the ratios.
#
# Six runs of SECONDS (default 25) each plus start-up: about 5 minutes in all.
# With the device tool:  run(command="bash benches/gpu.sh", carry=["target/gpu-bench"],
#                            timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${SECONDS_EACH:-25}
TORCH_PY=${TORCH_PY:-/opt/torch/.venv/bin/python}
BIN=target/gpu-bench/train_throughput
[ -x "$BIN" ] || { echo "gpu.sh: $BIN missing: build it with benches/build-gpu.sh and carry target/gpu-bench" >&2; exit 2; }
# cuBLAS/cuRAND/nvrtc come from PyTorch's environment; libcudart.so.13 from the carried folder.
CU13=$("$TORCH_PY" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH=$PWD/target/gpu-bench${CU13:+:$CU13}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$TORCH_PY" benches/compare.py --device cuda --config 100m --seconds "$SECONDS_EACH" \
  --candle-bin "$BIN" --python "$TORCH_PY" --variants "${VARIANTS:-f32,bf16,eager,sdpa,tf32,pt-bf16}"
