# Two commands set everything up on a fresh machine:
#   make test   - create .venv, install pinned deps, build the extension, run the whole suite, then check
#                 the user's install paths in fresh venvs (scripts/check_install.sh)
#   make bench  - same set-up, run the benchmarks (results under benchmarks/results/)
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-stamp
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MAX_JOBS ?= 2
# CUDA kernels are compiled whenever nvcc and a CUDA torch are present (FORCE_CUDA=1 insists).
# The test build covers the RTX Titan (sm_75) and Hopper (sm_90); `make build` honours STSSA_CUDA_ARCHS.
TEST_CUDA_ARCHS ?= 7.5;9.0
PYTEST := $(VPY) -m pytest -q -p no:cacheprovider

.PHONY: venv build build-test test test-cpu test-interpret compile-check ctest test-install bench demo clean

venv: $(STAMP)
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	touch $@

# --no-build-isolation: compile against the torch already in .venv (plain `pip install -e .` works too,
# but first installs a second torch into pip's isolated build environment).
build: $(STAMP)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .

build-test: $(STAMP)
	STSSA_CUDA_ARCHS="$${STSSA_CUDA_ARCHS:-$(TEST_CUDA_ARCHS)}" $(VPY) -m pip install -q --no-build-isolation --no-deps -e .

test: build-test
	$(MAKE) --no-print-directory test-cpu test-interpret compile-check ctest test-install

# Everything except the Triton-interpreter tests (those need TRITON_INTERPRET=1 set before triton loads).
test-cpu:
	$(PYTEST) tests -m "not interpret"

test-interpret:
	TRITON_INTERPRET=1 $(PYTEST) tests -m interpret

compile-check:
	$(VPY) -m stssa_kernels.compile_check --arch sm_75 --arch sm_80 --arch sm_86 --arch sm_90

ctest: $(STAMP)
	mkdir -p build
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(abspath $(VPY)) -DTORCH_CUDA_ARCH_LIST=7.5 > build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	cmake --build build/cmake -j $(MAX_JOBS)
	cd build/cmake && ctest --output-on-failure

# Fresh venvs under build/install-check: plain `pip install -e .` (build isolation) + smoke test; one wheel
# from plain `pip wheel .` under torch 2.13 CPU-only: CPU suite, then triton 3.6 interpreter tests + compile check.
test-install:
	PYTHON=$(PYTHON) bash scripts/check_install.sh

bench: build
	$(VPY) benchmarks/roi_align3d.py
	$(VPY) benchmarks/attn3d.py
	$(VPY) benchmarks/temporal_proj.py
	$(VPY) benchmarks/head.py

demo: build
	$(VPY) -m stssa.demo

clean:
	rm -rf build dist *.egg-info stssa_kernels/*.so
