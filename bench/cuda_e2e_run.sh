#!/usr/bin/env bash
# Whole-process conversion timings on a GPU host, in one device call (issue 11):
# build the extension with the CUDA backend, write a multi-GB bf16 Llama-shaped checkpoint, then
# bench_e2e.py's gpu row (ours --device cuda / --device cpu vs a plain copy, warm and cold cache).
#   OUT=/tmp/out bash bench/cuda_e2e_run.sh [layers hidden repeat]   (default 28 3072 2: ~6 GB)
set -uo pipefail
OUT=${OUT:-/tmp/qm_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1 XDG_CACHE_HOME=/tmp/qm_xdg_cache
cd "$(dirname "$0")/.."
t0=$(date +%s)
if ! timeout "${BUILD_LIMIT:-170}" bash bench/cuda_device_run.sh build; then
  # the CUDA build failed or ran too long for one call: a CPU-only build still gives the cpu rows
  echo "CUDA build failed or too slow: building without CUDA" | tee -a "$OUT/e2e_gpu.log"
  mkdir -p build/cpu && (cd build/cpu && cmake ../.. -G Ninja -DSKBUILD_PROJECT_NAME=quantize_model \
    -DSKBUILD_PROJECT_VERSION=0.1.0 -DQM_CUDA=OFF -DCMAKE_BUILD_TYPE=Release \
    -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" >cmake.log 2>&1 &&
    ninja >ninja.log 2>&1) && cp build/cpu/_kernels*.so converter/ || exit 1
fi
echo "build done after $(($(date +%s) - t0)) s" | tee -a "$OUT/e2e_gpu.log"
{
  nproc
  free -g | head -2
  df -h /tmp | tail -1
  python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
} 2>&1 | tee -a "$OUT/e2e_gpu.log"
python3 bench/bench_e2e.py --rows gpu --workdir /tmp --gpu-layers "${1:-28}" --gpu-hidden "${2:-3072}" \
  --repeat "${3:-2}" --json "$OUT/e2e_gpu.json" 2>&1 | tee -a "$OUT/e2e_gpu.log"
echo "total $(($(date +%s) - t0)) s" | tee -a "$OUT/e2e_gpu.log"
