#!/usr/bin/env bash
# Installs stssa-kernels the way a user does, in fresh venvs, and tests what got installed:
#   (a) venv A holding only torch + torchvision (requirements.txt's pins): plain `pip install -e .` (build
#       isolation on, no flags), then scripts/smoke_ops.py (every op, forward and backward).
#   (b) one wheel, built once by plain `pip wheel .` in venv A, installed into venv B holding another torch
#       (default the CPU-only torch==2.13.0+cpu, which ships no triton): smoke test and the CPU test suite
#       there; then triton==3.6.0 is added to venv B and the interpreter tests and
#       `python -m stssa_kernels.compile_check --arch sm_90` (the H200 machine's arch; a spill fails it) run
#       under it; then the interpreter tests once more under the newest triton (3.9.0, the one torch 2.15
#       brings), whose interpreter is stricter. The all-arch compile checks under 3.6 and 3.9 (each over
#       4 min with a cold Triton cache, against about 65 s per arch) are run by hand:
#       benchmarks/results/compile_check_*.json.
# The tests in venv B run from a copy of the tree without the two package folders, so everything they
# import (subprocesses included) comes from the installed wheel.
#
# Usage: bash scripts/check_install.sh [WORKDIR]     (default build/install-check; emptied first)
# Environment:
#   PYTHON         interpreter for the venvs (python3)
#   TORCH_B        torch requirement of venv B (torch==2.13.0+cpu)
#   TRITON_B       triton requirement added to venv B (triton==3.6.0) after the tests without triton, when
#                  B's torch ships none; a torch that brings its own (the CUDA builds: TORCH_B=torch==2.10.0)
#                  is tested with that one throughout
#   TRITON_NEWEST  triton requirement of the last interpreter run (triton==3.9.0); empty: skip it
#   BUILD_TORCH    torch the isolated build environments get, passed to pip as a build constraint:
#                  requirements.txt's pin by default (on local disk here); "any" lets pip choose as it does
#                  for a user (the newest torch on the index: a multi-GB download)
#   KEEP=1         keep the venvs (several GB) afterwards
#   CHECK_CUDA_ARCHS  CUDA archs of the two isolated builds (7.5: one arch keeps CI short; the CUDA code of
#                  every CI arch is already compiled by `make build-test`)
#   FORCE_CUDA, STSSA_NO_CUDA, MAX_JOBS reach the builds as usual.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mkdir -p "${1:-$ROOT/build/install-check}" && cd "${1:-$ROOT/build/install-check}" && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_B="${TORCH_B:-torch==2.13.0+cpu}"
TRITON_B="${TRITON_B:-triton==3.6.0}"
TRITON_NEWEST="${TRITON_NEWEST-triton==3.9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export STSSA_CUDA_ARCHS="${CHECK_CUDA_ARCHS:-7.5}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONPATH TRITON_INTERPRET PIP_BUILD_CONSTRAINT

T0=$SECONDS
declare -a TIMES=() FAILED=()
cpu_seconds() {  # CPU_NOW = user+sys seconds of this shell's finished children so far
  # `times` must run in this shell, not in a pipeline's or a $(...) subshell, which would count nothing
  times >"$WORK/.times"
  CPU_NOW=$(tail -n 1 "$WORK/.times" | awk '{ split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%d", u[1]*60 + u[2] + s[1]*60 + s[2] }')
}
run_step() {  # run_step hard|soft NAME CMD...: CMD's output goes to a log; on failure print the log's tail
  local kind="$1" name="$2" t=$SECONDS c log
  shift 2
  cpu_seconds; c=$CPU_NOW
  log="$WORK/logs/$(printf '%02d' ${#TIMES[@]})-$(echo "$name" | tr -c 'A-Za-z0-9.\n-' '_').log"
  echo "[check-install] $name ..."
  if "$@" >"$log" 2>&1; then
    cpu_seconds
    TIMES+=("$(printf '%5d s wall %5d s cpu  %s' $((SECONDS - t)) $((CPU_NOW - c)) "$name")")
    return 0
  fi
  cpu_seconds
  TIMES+=("$(printf '%5d s wall %5d s cpu  %s  FAILED' $((SECONDS - t)) $((CPU_NOW - c)) "$name")")
  echo "[check-install] FAILED: $name (after $((SECONDS - t)) s); last lines of $log:"
  tail -n 40 "$log"
  FAILED+=("$name")
  if [ "$kind" = hard ]; then summary; exit 1; fi
}
step() { run_step hard "$@"; }   # set-up: nothing after it can run without it
check() { run_step soft "$@"; }  # a test: the other tests still run, the script fails at the end
summary() {
  echo "[check-install] ${#FAILED[@]} step(s) failed, $((SECONDS - T0)) s in all:"
  printf '    %s\n' "${TIMES[@]}"
}
copy_tree() {  # the working tree as git sees it (tracked + untracked, not ignored): no build outputs
  mkdir -p "$1"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$1"
}
pin() { grep -E "^$1==" "$ROOT/requirements.txt" | sed 's/[[:space:]]*#.*//'; }

rm -rf "$WORK"/{a,b,src-e,src-w,run-b,dist,logs}
mkdir -p "$WORK/logs"
# Build constraints reach pip's isolated build environments (pip >= 25.3); the regular constraints of
# this machine's pip config do not.
BUILD_ENV=""  # BUILD_TORCH=any: pip chooses
if [ "${BUILD_TORCH:-}" != "any" ]; then
  echo "${BUILD_TORCH:-$(pin torch)}" >"$WORK/build-constraints.txt"
  BUILD_ENV="PIP_BUILD_CONSTRAINT=$WORK/build-constraints.txt"
fi
# Venv B's other packages at requirements.txt's pins (torch, torchvision and triton are B's own).
grep -vE '^[[:space:]]*(#|$)' "$ROOT/requirements.txt" | sed 's/[[:space:]]*#.*//' \
  | grep -viE '^(torch|torchvision|triton|numpy)([=<>! ]|$)' >"$WORK/constraints-b.txt"
# numpy < 2.4 in venv B: triton 3.6's interpreter breaks on numpy >= 2.4 for loops with runtime bounds
# (triton-lang/triton#9171, fixed in later tritons); it also puts a second numpy under the tests.
echo "numpy==2.3.5" >>"$WORK/constraints-b.txt"
copy_tree "$WORK/src-e"
copy_tree "$WORK/src-w"
copy_tree "$WORK/run-b"
rm -rf "$WORK/run-b/stssa" "$WORK/run-b/stssa_kernels"
A="$WORK/a/bin/python"
B="$WORK/b/bin/python"

# ---- (a) fresh venv + torch, plain editable install with build isolation, smoke test
step "venv A: $(pin torch) $(pin torchvision)" bash -c \
  "'$PYTHON' -m venv '$WORK/a' && '$A' -m pip install -q --upgrade pip && '$A' -m pip install -q '$(pin torch)' '$(pin torchvision)'"
step "venv A: pip install -e . (build isolation)" bash -c "cd '$WORK/src-e' && env $BUILD_ENV '$A' -m pip install -v -e ."
grep -h '^ *\[stssa-kernels\]' "$WORK"/logs/*pip_install_-e* | sort -u | sed 's/^ */    /' || true
check "venv A: smoke test (editable install)" bash -c "cd '$WORK' && '$A' '$ROOT/scripts/smoke_ops.py' --expect-under '$WORK/src-e'"

# ---- (b) one wheel, another torch
step "venv A: pip wheel . (build isolation)" bash -c \
  "cd '$WORK/src-w' && env $BUILD_ENV '$A' -m pip wheel -v --no-deps -w '$WORK/dist' ."
WHEEL="$(ls "$WORK"/dist/stssa_kernels-*.whl)"
echo "    wheel: $(basename "$WHEEL")"
SITE_B="$WORK/b/lib"  # the wheel must be what venv B's tests import
TORCH_VERSION='import torch; print(torch.__version__)'
step "venv B: $TORCH_B" bash -c \
  "'$PYTHON' -m venv '$WORK/b' && '$B' -m pip install -q --upgrade pip && '$B' -m pip install -q '$TORCH_B'"
TORCH_B_VERSION="$("$B" -c "$TORCH_VERSION" 2>/dev/null)"  # (no numpy yet: torch warns)
# the triton B's torch brought (none for the CPU-only builds), read before the wheel can add anything
TRITON_OF_TORCH_B="$("$B" -c 'import importlib.metadata as m; print(m.version("triton"))' 2>/dev/null || true)"
step "venv B: the wheel + test deps" "$B" -m pip install -q -c "$WORK/constraints-b.txt" "$WHEEL[test,train]"
if [ "$("$B" -c "$TORCH_VERSION" 2>/dev/null)" != "$TORCH_B_VERSION" ]; then
  echo "[check-install] FAILED: installing the wheel replaced torch $TORCH_B_VERSION in venv B"; exit 1
fi
if [ -z "$TRITON_OF_TORCH_B" ]; then
  WITH="no triton"
  check "venv B: smoke test (wheel, $WITH)" bash -c \
    "cd '$WORK' && '$B' -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(\"triton\") and \"the wheel brought triton into venv B\")' \
     && '$B' '$ROOT/scripts/smoke_ops.py' --expect-under '$SITE_B'"
else
  WITH="torch's triton $TRITON_OF_TORCH_B"
  check "venv B: smoke test (wheel, $WITH)" bash -c "cd '$WORK' && '$B' '$ROOT/scripts/smoke_ops.py' --expect-under '$SITE_B'"
fi
check "venv B: CPU test suite ($WITH)" bash -c \
  "cd '$WORK/run-b' && STSSA_EXPECT_INSTALLED_UNDER='$SITE_B' '$B' -m pytest -q -p no:cacheprovider tests -m 'not interpret'"
tail -n 1 "$WORK"/logs/*CPU_test_suite*.log | sed 's/^/    /'
if [ -z "$TRITON_OF_TORCH_B" ]; then
  step "venv B: + $TRITON_B" "$B" -m pip install -q "$TRITON_B"
  TRITON_B_VERSION="$("$B" -c 'import importlib.metadata as m; print(m.version("triton"))')"
else
  TRITON_B_VERSION="$TRITON_OF_TORCH_B"
fi
interpreter_tests() {  # interpreter_tests LABEL: the Triton-interpreter tests under venv B's triton
  check "venv B: interpreter tests ($1)" bash -c \
    "cd '$WORK/run-b' && TRITON_INTERPRET=1 STSSA_EXPECT_INSTALLED_UNDER='$SITE_B' '$B' -m pytest -q -p no:cacheprovider tests -m interpret"
  tail -n 1 "$(ls -t "$WORK"/logs/*interpreter_tests*.log | head -n 1)" | sed 's/^/    /'
}
interpreter_tests "triton $TRITON_B_VERSION"
check "venv B: compile_check (triton $TRITON_B_VERSION)" bash -c \
  "cd '$WORK/run-b' && '$B' -m stssa_kernels.compile_check --arch sm_90"  # a spill fails it
tail -n 1 "$WORK"/logs/*compile_check*.log | sed 's/^/    /'
if [ -z "$TRITON_OF_TORCH_B" ] && [ -n "$TRITON_NEWEST" ]; then
  step "venv B: + $TRITON_NEWEST" "$B" -m pip install -q "$TRITON_NEWEST"
  interpreter_tests "$TRITON_NEWEST"
fi

if [ "${KEEP:-0}" != "1" ]; then rm -rf "$WORK"/{a,b,src-e,src-w,run-b}; fi
summary
[ ${#FAILED[@]} -eq 0 ] || exit 1
echo "[check-install] all steps passed"
