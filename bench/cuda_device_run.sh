#!/usr/bin/env bash
# One full GPU session in one command (device machines are bare and billed by the minute):
# build the extension with the CUDA backend, run the CUDA tests, write the bnb golden files,
# check them with the CPU golden test, run the benchmark. Logs and outputs go to $OUT.
#   bash bench/cuda_device_run.sh [build|test|golden|bench|convert|all ...]   (default: all)
set -uo pipefail
OUT=${OUT:-/tmp/qm_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1
steps=${*:-all}
has() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }
PY=python3
cd "$(dirname "$0")/.."

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/env.log"

for wheels in .carry/wheels .carry/qm-pipeline; do
  if ls "$wheels"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps "$wheels"/*.whl 2>&1 | tail -2
  fi
done

if has build; then
  t0=$(date +%s)
  mkdir -p build/device && (
    cd build/device &&
      cmake ../.. -G Ninja -DSKBUILD_PROJECT_NAME=quantize_model -DSKBUILD_PROJECT_VERSION=0.1.0 \
        -DQM_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
        -Dpybind11_DIR="$($PY -c 'import pybind11; print(pybind11.get_cmake_dir())')" >cmake.log 2>&1 &&
      ninja >ninja.log 2>&1
  ) || { tail -50 build/device/cmake.log build/device/ninja.log | tee "$OUT/build.log"; exit 1; }
  cp build/device/_kernels*.so converter/
  echo "build ok in $(($(date +%s) - t0)) s" | tee "$OUT/build.log"
fi

rc=0
if has test; then
  timeout 420 $PY -m pytest -q -p no:cacheprovider -rs -m cuda tests/cuda tests/loader/test_loader_cuda.py \
    tests/converter/test_convert_cuda.py >"$OUT/test_cuda_full.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/test_cuda_full.log" | tail -40 | tee "$OUT/test_cuda.log"
  $PY -m pytest -q -p no:cacheprovider -s tests/cuda/test_cuda_vs_bnb.py 2>&1 | grep -E "bnb-vs-ours|^nested" >"$OUT/bnb_counts.log"
  cat "$OUT/bnb_counts.log"
  $PY -m pytest -q -p no:cacheprovider tests/golden 2>&1 | tail -3
fi
if has golden; then
  $PY bench/gen_golden.py --out "$OUT" 2>&1 | tail -3
  cp "$OUT"/bnb_cuda_golden.* tests/golden/
  $PY -m pytest -q -p no:cacheprovider tests/golden 2>&1 | tail -15 | tee "$OUT/test_golden.log"
fi
if has bench; then
  # BENCH_ARGS: e.g. "--ops gemv,dequantize" to time a subset
  $PY bench/bench_cuda.py ${BENCH_ARGS:-} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
fi
if has convert; then
  $PY bench/bench_cuda_convert.py --workdir /tmp/qm_e2e 2>&1 | tee "$OUT/convert.log"
fi
exit $rc
