#!/usr/bin/env bash
# Everything GPU-side in one call: build the extension for this GPU, run the whole test suite (GPU tests
# included), the compile check, and every benchmark. Meant for a machine with a CUDA GPU and a CUDA build
# of torch already installed (no package registry needed):
#     bash scripts/gpu_check.sh            # logs and result JSON under $OUT (default benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ==="; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
cap=$($PY -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")

step "build (sm $cap)"
FORCE_CUDA=1 STSSA_CUDA_ARCHS="$cap" $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
$PY -c "import stssa_kernels; print('build info:', stssa_kernels.BUILD_INFO)"

step "tests (GPU + CPU paths)"
$PY -m pytest -q -p no:cacheprovider tests -m "not interpret" -rs 2>&1 | tee "$OUT/pytest_gpu.log" | tail -30 || status=1
step "tests under the Triton interpreter"
TRITON_INTERPRET=1 $PY -m pytest -q -p no:cacheprovider tests -m interpret 2>&1 | tail -5 || status=1

step "compile check"
$PY -m stssa_kernels.compile_check --arch sm_75 --arch sm_80 --arch sm_90 2>&1 | tail -15 || status=1

step "benchmarks"
for b in roi_align3d attn3d temporal_proj head; do
  if [ -f "benchmarks/$b.py" ]; then
    $PY "benchmarks/$b.py" 2>&1 | tee "$OUT/bench_$b.log" | tail -40 || status=1
  fi
done
[ "$OUT" != "benchmarks/results" ] && cp benchmarks/results/*.json benchmarks/results/*.png "$OUT"/ 2>/dev/null
exit $status
