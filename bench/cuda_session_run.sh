#!/usr/bin/env bash
# The GPU numbers of one release, in as few device calls as possible (device machines are bare and
# billed by the minute). Installs carried wheels (.whl/: bitsandbytes 0.50.2, transformers 5.24), builds
# the extension with the CUDA backend once (kept between calls on a warm machine), then runs the named
# steps in order, each writing $OUT/<step>.log (warnings and progress bars filtered: files over 16 MiB
# do not come back from the device machine).
#   OUT=/tmp/out bash bench/cuda_session_run.sh env gen offload ...
# Steps:
#   env      GPU, versions, same-run device-to-device copy bandwidth
#   tests    every `-m cuda` test
#   newtests the CUDA tests of this round's new kernels and load path only (when device time is short)
#   gen      bench_generate.py: 8B Llama-3.1-shaped random model, 512-token prompt, 128 new tokens,
#            eager and compiled (static cache, reduce-overhead), ours / transformers + bnb / bf16
#   graphed  bench_generate.py modes graphed, graphed-compiled (graphed_greedy: 16 decode steps per
#            CUDA-graph replay) on the same 8B model, every contender ($CONTENDERS, default all three)
#   dectests the CUDA tests of graphed_greedy only
#   checks   bench_decode_checks.py --device cuda: host cost per generate() call of graphed_greedy's checks
#   gensample bench_generate.py --sample on the same 8B model: sampled decode (temperature 0.7, top-k 50,
#            top-p 0.9), modes $SAMPLE_MODES (default eager,graphed), contenders $CONTENDERS (default ours,bf16)
#   compiletests the CUDA compile tests (keyed 4-bit ops in compiled steps, CUDA graphs, sibling launches)
#   benchsmoke the shared bench CUDA helpers (cuda_timing, cuda_nf4) through three short scripts
#   profile  profile_graphed.py: kernels per graphed decode token by family (8 layers), eager and compiled step
#   load     bench_generate.py --load on the same 8B folder: call -> first token (+ where the time goes: --load-breakdown),
#            contenders $LOAD_CONTENDERS (default ours,bnb,bf16), timeout $LOAD_TIMEOUT (default 320 s)
#   loadproc bench_load_process.py --device cuda on the same 8B folder: whole processes as a user's script
#            runs them (each contender imports only what it needs), $LOAD_CASES, $LOAD_REPEATS (default 3)
#   quality  real SmolLM2 weights cut to travel (bench/quality_sample.py, carried: .cache/quality): perplexity
#            and logits, one forward (dequantize path) and token by token (fused GEMV), ours / bnb / bf16
#   overhead bench_linear_overhead.py: host cost of one eager linear call, ours / F.linear / bnb
#   offload  bench_offload.py --device cuda on the same 8B folder: half of it on the CPU
#   e2e      bench/cuda_e2e_run.sh: whole-process convert --device cuda / cpu vs a plain copy
#   gemv     bench_gemv_cuda.py: batch-1/4 GEMV kernels inside CUDA graphs vs the copy floor
#   multi    bench_gemv_multi_cuda.py: one launch for q/k/v or gate/up vs separate launches vs bf16
#   rebuild  rebuild the extension (incremental; a warm machine keeps the previous call's build)
#   moetests the MoE CUDA tests and the stream / multi GEMV tests (the kernels they share)
#   moegemv  bench_moe_gemv_cuda.py: the MoE decode kernels alone (gate/up + SiLU, down + routing sum) in CUDA graphs
#   moencu   ncu --set full on those two kernels (bench/profile_moe_gemv.py)
#   moeprof  bench_moe.py --modes profile,graphed-compiled at $MOE_LAYERS (default 12) layers: kernels per token by family
#   moe      bench_moe.py --device cuda: whole Qwen3-30B-A3B-shaped model (MOE_LAYERS, default 48 layers),
#            ours vs bf16: memory, MoE blocks, generate() eager and compiled
#   moeall   every cuda-marked test under tests/moe (after a change to the shared experts forward)
#   llama4   bench_llama4.py --device cuda: Llama 4 Scout's shapes at $LLAMA4_LAYERS (default 4) layers, $LLAMA4_MODES
#            (default eager; eager,compiled,graphed-compiled), routed 4-bit experts (LLAMA4_EXPERTS=keep: 16-bit)
#            vs the same folder run densely vs transformers + bnb vs bf16 (LLAMA4_ONLY: contender prefixes), decode
#   moehost  bench_moe.py at $MOE_LAYERS (default 12) layers, modes compiled and graphed-compiled, with
#            MOE_HOST_PROFILE=1: per decode token, wall vs device-busy time and the host functions that take it
#   probe    probe_warmup.py: the load warm-up's first calls per op, on threads, beside busy threads; a first forward after it
#   host     bench_cuda_host.py: --device cuda conversion on the GPU without torch, bytes = --device cpu
#   int8     bench_int8.py --device cuda
set -uo pipefail
# A device call returns at most 8 files from $OUT: the steps write to a work folder, packed into
# $OUT/session-<pid>.tgz when the script ends (unpack: tar xzf session-*.tgz).
FINAL_OUT=${OUT:-/tmp/qm_out}
mkdir -p "$FINAL_OUT"
OUT=$(mktemp -d /tmp/qm_session_out.XXXX)
export OUT
trap 'tar czf "$FINAL_OUT/session-$$.tgz" -C "$OUT" .' EXIT
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XDG_CACHE_HOME=/tmp/qm_xdg_cache
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import converter._kernels as k; assert k.has_cuda_build() and hasattr(k, 'CudaHostPipeline')" 2>/dev/null; then
  bash bench/cuda_device_run.sh build || exit 1
fi
GEN_DIR=/tmp/qm_gen
quiet() { # drop warnings, progress bars and blank lines; keep pytest's summary (it says "N warnings");
  # flush every line, so a step killed by an outer timeout keeps what it printed
  awk '{ l = tolower($0) } l ~ /passed|failed/ { print; fflush(); next }
       l ~ /warn|it\/s]|loading weights|writing model shards/ || l ~ /^[ \t]*$/ { next } { print; fflush() }'
}
step() { # step NAME COMMAND...: run from /tmp (outside the source tree), log to $OUT/NAME.log
  local name=$1 t0
  shift
  t0=$(date +%s)
  echo "== $name" | tee -a "$OUT/steps.log"
  (cd /tmp && "$@") 2>&1 | quiet | head -c 900000 >"$OUT/$name.log"
  echo "== $name: rc ${PIPESTATUS[0]}, $(($(date +%s) - t0)) s" | tee -a "$OUT/steps.log"
  tail -25 "$OUT/$name.log"
}

env_info() {
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
}

GEN="python3 $ROOT/bench/bench_generate.py --device cuda --model random-8b --workdir $GEN_DIR"
for s in ${*:-env}; do
  case $s in
    env) step env env_info ;;
    tests) step tests timeout 400 python3 -m pytest -q -p no:cacheprovider -rs -m cuda "$ROOT/tests" --ignore="$ROOT/tests/hub" ;;  # hub: no httpx2 there
    gen) step gen timeout 360 $GEN --prompt 512 --new 128 --repeats "${REPEATS:-1}" --modes eager,compiled --json "$OUT/gen.json" ;;
    graphed) step graphed timeout 420 $GEN --prompt 512 --new 128 --repeats "${REPEATS:-1}" \
      --contenders "${CONTENDERS:-ours,bnb,bf16}" --modes graphed,graphed-compiled --json "$OUT/graphed.json" ;;
    gensample) step gensample timeout 420 $GEN --prompt 512 --new 128 --repeats "${REPEATS:-1}" --sample \
      --contenders "${CONTENDERS:-ours,bf16}" --modes "${SAMPLE_MODES:-eager,graphed}" --json "$OUT/gensample.json" ;;
    dectests) step dectests timeout 200 python3 -m pytest -q -p no:cacheprovider -rs -m cuda \
      "$ROOT/tests/loader/test_loader_decode_cuda.py" ;;
    checks) step checks timeout 120 python3 "$ROOT/bench/bench_decode_checks.py" --device cuda --json "$OUT/checks.json" ;;
    compiletests) step compiletests timeout 240 python3 -m pytest -q -p no:cacheprovider -rs "$ROOT/tests/loader/test_loader_cuda_compile.py" \
      "$ROOT/tests/loader/test_loader_siblings_cuda.py" "$ROOT/tests/loader/test_loader_compile_keyed.py" "$ROOT/tests/loader/test_loader_decode_cuda.py" \
      "$ROOT/tests/moe/test_moe_compile_keyed.py" ;;
    profile) step profile timeout 300 bash -c "python3 $ROOT/bench/profile_graphed.py --layers 8 && \
      python3 $ROOT/bench/profile_graphed.py --layers 8 --compile-step" ;;
    benchsmoke) step benchsmoke timeout 60 bash -c "python3 $ROOT/bench/profile_gemv.py 4096x4096 --variant 11 && echo prof ok && \
      python3 $ROOT/bench/bench_gemv_cuda.py --shapes 4096x4096 --replays 5 | tail -8" ;;
    load) step load timeout "${LOAD_TIMEOUT:-320}" $GEN --prompt 16 --new 2 --modes "" --load --load-repeats 2 --load-breakdown \
      --load-contenders "${LOAD_CONTENDERS:-ours,bnb,bf16}" --json "$OUT/load.json" ;;
    loadproc) step loadproc timeout "${LOAD_TIMEOUT:-420}" bash -c "{ [ -d $GEN_DIR/llama8b-32-nf4 ] || $GEN --prompt 4 --new 2 --modes ''; } && \
      python3 $ROOT/bench/bench_load_process.py --device cuda --folder $GEN_DIR/llama8b-32-nf4 --repeat ${LOAD_REPEATS:-3} \
      --cases '${LOAD_CASES:-ours,ours verify,transformers + bnb}' --json $OUT/loadproc.json" ;;
    quality) step quality timeout 300 bash -c "rm -rf /tmp/qm_quality && \
      python3 -c 'from converter.cli import main; main()' dequantize $ROOT/.cache/quality/smollm2-12l-nf4 /tmp/qm_quality/plain -q && \
      python3 $ROOT/bench/bench_generate.py --device cuda --model /tmp/qm_quality/plain --nf4 $ROOT/.cache/quality/smollm2-12l-nf4 \
        --modes '' --quality --json $OUT/quality.json" ;;
    overhead) step overhead python3 "$ROOT/bench/bench_linear_overhead.py" --device cuda \
      --shapes 64x64,4096x4096,14336x4096 --json "$OUT/overhead.json" ;;
    offload) step offload timeout 240 python3 "$ROOT/bench/bench_offload.py" --device cuda --model "$GEN_DIR/llama8b-32-nf4" \
      --source "$GEN_DIR/llama8b-32" --tokens 16 ;;
    e2e) step e2e timeout 240 bash "$ROOT/bench/cuda_e2e_run.sh" 28 3072 1 ;;
    multi) step multi timeout 150 python3 "$ROOT/bench/bench_gemv_multi_cuda.py" --variants "${MULTI_VARIANTS:-}" \
      --groups "${MULTI_GROUPS:-}" --json "$OUT/multi.json" ;;
    rebuild) step rebuild bash "$ROOT/bench/cuda_device_run.sh" build ;;  # a warm machine keeps the last build: after a kernel change
    moetests) step moetests timeout 300 python3 -m pytest -q -p no:cacheprovider -rs -m cuda "$ROOT/tests/moe/test_moe_cuda.py" \
      "$ROOT/tests/moe/test_moe_router_cuda.py" "$ROOT/tests/cuda/test_cuda_gemv_stream.py" "$ROOT/tests/cuda/test_cuda_gemv_multi.py" ;;
    moeall) step moeall timeout "${MOEALL_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rs -m cuda "$ROOT/tests/moe" ;;
    moegemv) step moegemv timeout 120 python3 "$ROOT/bench/bench_moe_gemv_cuda.py" --replays 15 --json "$OUT/moegemv.json" ;;
    moencu) step moencu timeout 240 bash -c "for k in grouped_glu grouped_sum; do ncu --clock-control none -k regex:\$k \
      --launch-skip 2 --launch-count 1 --set full python3 $ROOT/bench/profile_moe_gemv.py; done" ;;
    moeprof) step moeprof timeout "${MOE_TIMEOUT:-300}" python3 "$ROOT/bench/bench_moe.py" --device cuda --layers "${MOE_LAYERS:-12}" \
      --repeat 2 --modes "profile,graphed-compiled" --workdir /tmp/qm_moe --json "$OUT/moeprof.json" ;;
    gemv) step gemv python3 "$ROOT/bench/bench_gemv_cuda.py" --replays 15 --json "$OUT/gemv.json" ;;
    moe) step moe timeout "${MOE_TIMEOUT:-240}" python3 "$ROOT/bench/bench_moe.py" --device cuda --layers "${MOE_LAYERS:-48}" --repeat 2 --modes "${MOE_MODES:-eager,compiled,graphed-compiled}" \
      --workdir /tmp/qm_moe --json "$OUT/moe.json" ;;
    llama4) step llama4 timeout "${LLAMA4_TIMEOUT:-240}" python3 "$ROOT/bench/bench_llama4.py" --device cuda \
      --layers "${LLAMA4_LAYERS:-4}" --modes "${LLAMA4_MODES:-eager}" --prompt 64 --new 32 --repeat 2 --workdir /tmp/qm_llama4 --json "$OUT/llama4.json" \
      --moe-experts "${LLAMA4_EXPERTS:-quantize}" ${LLAMA4_ONLY:+--only "$LLAMA4_ONLY"} ;;
    moehost) step moehost timeout "${MOE_TIMEOUT:-300}" env MOE_HOST_PROFILE=1 python3 "$ROOT/bench/bench_moe.py" \
      --device cuda --layers "${MOE_LAYERS:-12}" --repeat 2 --modes compiled,graphed-compiled --workdir /tmp/qm_moe \
      --json "$OUT/moehost.json" ;;
    probe) step probe timeout 300 python3 "$ROOT/bench/probe_warmup.py" --json "$OUT/probe.json" ;;
    host) step host python3 "$ROOT/bench/bench_cuda_host.py" --layers 8 --hidden 3072 ;;
    int8) step int8 timeout 60 python3 "$ROOT/bench/bench_int8.py" --device cuda --iters 20 --json "$OUT/int8.json" ;;
    newtests) step newtests timeout 200 python3 -m pytest -q -p no:cacheprovider -rs -m cuda "$ROOT/tests/moe/test_moe_llama4.py" \
      "$ROOT/tests/moe/test_moe_gpt_oss.py" "$ROOT/tests/loader/test_loader_module.py" "$ROOT/tests/loader/test_loader_int8.py" ;;
    *) echo "unknown step $s" >&2 ;;
  esac
done
