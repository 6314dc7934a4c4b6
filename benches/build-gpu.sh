#!/usr/bin/env bash
# Builds the CUDA benchmark binary on a machine without a GPU (the recipe of
# ../shared/docs/cuda-build.md), for benches/gpu.sh to run on an H100/H200:
#   target/gpu-bench/train_throughput.gz  (stripped, --features cuda, sm_90a kernels)
#   target/gpu-bench/jobd.gz, jobctl.gz    (the daemon with CUDA, and its client)
#   target/gpu-bench/libcudart.so.13      (the CUDA runtime they need at start)
# Carry target/gpu-bench to the GPU machine (the device tool's `carry`), then run
# `bash benches/gpu.sh` there.
#
# Costs: ~1 GB of CUDA 13.0 wheels from PyPI into target/cuda-wheels (once); a clean build of
# candle's CUDA kernels takes 25-35 min on 2 cores, later ones 2-3 min.
#
# Why the patched candle-core: upstream candle-core links libcuda/cuBLAS/cuRAND/nvrtc at build
# time (cudarc `dynamic-linking`), which needs a libcuda stub no wheel ships and a binary that
# cannot start without a driver. A copy of the registry crate with that one cudarc feature
# switched to `dynamic-loading` (as jobd's own cudarc uses; cargo unifies the two) is used via
# `--config patch...`; candle's source is not committed. Cargo.lock is restored afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=$ROOT/target/cuda-wheels
OUT=$ROOT/target/gpu-bench
# A target directory of its own, so that the CPU build's artifacts stay valid beside it.
export CARGO_TARGET_DIR=$ROOT/target/cuda
PATCHED=$ROOT/target/candle-core-patched

# nvcc must match the driver's CUDA (13.0 for driver 580 on the lent H200): candle embeds PTX
# that the driver JIT-compiles, and a newer nvcc emits PTX an older driver rejects.
if [ ! -x "$WHEELS/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip install --quiet --no-deps --target "$WHEELS" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-nvrtc==13.0.88
fi
R=$WHEELS/nvidia/cu13
[ -e "$R/lib64" ] || ln -s lib "$R/lib64"
[ -e "$R/lib/libcudart.so" ] || ln -s libcudart.so.13 "$R/lib/libcudart.so"

# candle-core from cargo's registry, with cudarc loaded at run time.
cargo fetch --locked >/dev/null
SRC=$(ls -d "$HOME"/.cargo/registry/src/*/candle-core-0.11.1 | head -1)
if [ ! -f "$PATCHED/Cargo.toml" ] || [ "$SRC/Cargo.toml" -nt "$PATCHED/Cargo.toml" ]; then
  rm -rf "$PATCHED"
  cp -r "$SRC" "$PATCHED"
  chmod -R u+w "$PATCHED"
  sed -i 's/"dynamic-linking",/"dynamic-loading",/' "$PATCHED/Cargo.toml"
fi
grep -q '"dynamic-loading"' "$PATCHED/Cargo.toml"

cp Cargo.lock target/Cargo.lock.before-gpu-build
trap 'cp target/Cargo.lock.before-gpu-build Cargo.lock' EXIT

# CUDA_COMPUTE_CAP=90 builds sm_90a: H100/H200 only. LIBRARY_PATH (not RUSTFLAGS, which would
# force a full rebuild) lets candle-kernels find -lcudart.
export PATH=$R/bin:$PATH CUDA_HOME=$R CUDA_PATH=$R CUDA_COMPUTE_CAP=90 LIBRARY_PATH=$R/lib
cargo bench --bench train_throughput --features cuda --no-run \
  --config "patch.crates-io.candle-core.path=\"$PATCHED\"" 2>&1 | tee target/gpu-build.log
BIN=$(grep -o 'target/cuda/release/deps/train_throughput-[0-9a-f]*' target/gpu-build.log | tail -1)
# jobd (with CUDA, for `jobd worker`) and jobctl, for the end-to-end train job on the GPU;
# the same profile as the benchmark, so nothing is built twice.
cargo build --profile bench --features cuda --bins \
  --config "patch.crates-io.candle-core.path=\"$PATCHED\"" 2>&1 | tee -a target/gpu-build.log
rm -rf "$OUT"
mkdir -p "$OUT"
cp "$ROOT/$BIN" "$OUT/train_throughput"
cp "$CARGO_TARGET_DIR/release/jobd" "$CARGO_TARGET_DIR/release/jobctl" "$OUT/"
strip "$OUT/train_throughput" "$OUT/jobd" "$OUT/jobctl"
# Compressed to fit the device tool's 64 MiB; benches/gpu.sh unpacks them.
gzip -f "$OUT/train_throughput" "$OUT/jobd" "$OUT/jobctl"
cp -L "$R/lib/libcudart.so.13" "$OUT/"
ls -l "$OUT"
echo "carry target/gpu-bench to the GPU machine and run: bash benches/gpu.sh"
