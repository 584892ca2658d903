#!/usr/bin/env bash
# Everything GPU-side in one call: build the extension for this GPU, run the GPU tests, then every
# benchmark; logs and result JSON are packed into $OUT/gpu_check.tar.gz (one file: the device tool
# returns at most 8) with a short summary printed last. Meant for a machine with a CUDA GPU and a CUDA
# build of torch already installed (no package registry needed):
#     OUT=/some/dir bash scripts/gpu_check.sh
# Sized for a 10-minute call: each step has its own time limit (seconds, below), and no step starts
# past DEADLINE (default 540 s) - what did not fit is named in the summary, to run in a second call
# (STEPS="bench" BENCHES="..."; the in-place build stays on a warm machine). STEPS picks steps
# (default "build gputests bench"; also "cputests", "interpret", "compilecheck", which CI runs on every
# submission anyway); BENCHES picks benchmarks, most important first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu_check}
STEPS=${STEPS:-build gputests bench}
BENCHES=${BENCHES:-attn3d temporal_proj head roi_align3d}
T_BUILD=${T_BUILD:-240} T_TESTS=${T_TESTS:-200} T_BENCH=${T_BENCH:-150} DEADLINE=${DEADLINE:-540}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
status=0
summary=()
t0=$SECONDS
step() { echo; echo "=== $* (t=$((SECONDS - t0))s) ==="; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
# seconds a step may take: its own limit, capped by what is left before DEADLINE (0: skip it)
budget() { local left=$((DEADLINE - (SECONDS - t0) - 5)); [ $left -lt 20 ] && echo 0 || echo $(( $1 < left ? $1 : left )); }
note() { summary+=("$(printf '%-34s %s' "$1" "$2")"); }
pack() {
  cp benchmarks/results/*.json benchmarks/results/*.png "$LOGS"/ 2>/dev/null
  tar -czf "$OUT/gpu_check.tar.gz" -C "$LOGS" . 2>/dev/null
  echo; echo "=== summary (t=$((SECONDS - t0))s; logs and JSON in $OUT/gpu_check.tar.gz) ==="
  printf '%s\n' "${summary[@]}"
}
trap pack EXIT

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
cap=$($PY -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")
git log -1 --format='commit %H %s' 2>/dev/null || true

if has build; then
  step "build (sm $cap)"
  s=$SECONDS
  if FORCE_CUDA=1 STSSA_CUDA_ARCHS="$cap" timeout "$(budget "$T_BUILD")" $PY setup.py -q build_ext --inplace > "$LOGS/build.log" 2>&1; then
    note build "ok ($((SECONDS - s)) s)"
  else
    tail -40 "$LOGS/build.log"; note build "FAILED"; exit 1
  fi
  $PY -c "import stssa_kernels; print('build info:', stssa_kernels.BUILD_INFO)"
fi

run_tests() {  # name, time limit, pytest args...
  local name=$1 limit; limit=$(budget "$2"); shift 2
  if [ "$limit" -eq 0 ]; then note "$name" "SKIPPED: past DEADLINE"; return; fi
  step "$name"
  timeout "$limit" $PY -m pytest -q -p no:cacheprovider -rfEs "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -25 "$LOGS/$name.log"
  note "$name" "$(tail -1 "$LOGS/$name.log") (rc $rc)"
  [ $rc -eq 0 ] || status=1
}
has gputests && run_tests gputests "$T_TESTS" tests -m gpu
has cputests && run_tests cputests 900 tests -m "not interpret and not gpu"
has interpret && TRITON_INTERPRET=1 run_tests interpret 900 tests -m interpret

if has compilecheck; then
  step "compile check"
  $PY -m stssa_kernels.compile_check --arch sm_75 --arch sm_80 --arch sm_90 > "$LOGS/compile_check.log" 2>&1 || status=1
  tail -8 "$LOGS/compile_check.log"
fi

if has bench; then
  for b in $BENCHES; do
    [ -f "benchmarks/$b.py" ] || continue
    limit=$(budget "$T_BENCH")
    if [ "$limit" -eq 0 ]; then note "bench $b" "SKIPPED: past DEADLINE (run STEPS=bench BENCHES=$b)"; continue; fi
    step "benchmark $b"
    s=$SECONDS
    timeout "$limit" $PY "benchmarks/$b.py" > "$LOGS/bench_$b.log" 2>&1
    rc=$?
    tail -45 "$LOGS/bench_$b.log"
    note "bench $b" "rc $rc, $((SECONDS - s)) s$([ $rc -eq 124 ] && echo ' (TIMED OUT: raise T_BENCH or run alone)')"
    [ $rc -eq 0 ] || status=1
  done
fi
exit $status
