#!/usr/bin/env bash
# One GPU session for issue 12's numbers: the loader's CUDA + compile tests, per-call overhead, and
# bench_generate.py on an 8B Llama-3.1-shaped random model. Uses a carried prebuilt extension
# (converter/_kernels*.so for the machine's python) when it imports, else builds one; a carried
# bitsandbytes goes in .site/ (import path). Logs and json go to $OUT.
#   bash bench/cuda_generate_run.sh [test overhead eager compiled load]   (default: test overhead eager)
set -uo pipefail
OUT=${OUT:-/tmp/qm_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (e.g. transformers 5.24: the converter's selection needs it)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
steps=" ${*:-test overhead eager} "
has() { [[ "$steps" == *" $1 "* ]]; }
GEN="python3 bench/bench_generate.py --device cuda --model random-8b --prompt ${PROMPT:-512} --new ${NEW:-128}"
GEN="$GEN --repeats ${REPEATS:-2} --workdir /tmp/qm_gen ${LAYERS:+--layers $LAYERS}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bnb', b.__version__)"
  python3 - <<'PY'
import torch
x = torch.empty(1 << 31, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(10): y.copy_(x)
e.record(); torch.cuda.synchronize()
print(f"device-to-device copy: {2 * x.numel() * 10 / (s.elapsed_time(e) / 1e3) / 1e9:.0f} GB/s (read + write)")
PY
} 2>&1 | tee "$OUT/env.log"
if ! python3 -c "import converter._kernels as k; assert k.has_cuda_build(); print('carried extension:', k.cuda_available())" 2>&1 | tee -a "$OUT/env.log"; then
  bash bench/cuda_device_run.sh build
fi

rc=0
if has test; then
  TORCHDYNAMO_DISABLE=1 timeout 300 python3 -m pytest -q -p no:cacheprovider -rs -m cuda \
    tests/loader/test_loader_cuda.py tests/loader/test_loader_cuda_compile.py \
    tests/loader/test_loader_stream_cuda.py >"$OUT/test_cuda.log" 2>&1
  rc=$?
  tail -15 "$OUT/test_cuda.log"
fi
if has overhead; then
  python3 bench/bench_linear_overhead.py --device cuda --shapes 64x64,4096x4096,14336x4096 \
    --json "$OUT/overhead.json" 2>&1 | tee "$OUT/overhead.log"
fi
if has eager; then
  $GEN --modes eager ${LOAD:+--load} --json "$OUT/gen_eager.json" 2>&1 | grep -v -i warn | tee "$OUT/gen_eager.log"
fi
if has load; then  # call -> first token: ours verify on/off vs transformers + bnb vs bf16, + a profile
  $GEN --modes '' --load --load-profile --json "$OUT/gen_load.json" 2>&1 | grep -v -i warn | tail -c 500000 >"$OUT/gen_load.log"
fi
if has compiled; then
  $GEN --modes compiled --json "$OUT/gen_compiled.json" 2>&1 | grep -v -i warn | tee "$OUT/gen_compiled.log"
fi
exit $rc
