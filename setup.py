"""Build script for stssa-kernels.

The C++/CUDA extension ``stssa_kernels._C`` is compiled with ninja against the *installed* torch, so
install with ``pip install -e . --no-build-isolation``: an isolated build environment would fetch a
different torch wheel to compile against, and the resulting binary would not load next to the torch
in your environment.

Environment variables:
  FORCE_CUDA=1          compile the CUDA kernels even without a visible GPU (needs nvcc); fail if
                        that is impossible.
  STSSA_NO_CUDA=1       never compile CUDA kernels (CPU-only extension).
  STSSA_CUDA_ARCHS      ';'-separated compute capabilities, default "7.5;8.0;8.6;8.9;9.0+PTX"
                        (7.5 = RTX Titan, the project's named target).
  MAX_JOBS              parallel compile jobs for ninja.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _log(msg):
    print(f"[stssa-kernels] {msg}", file=sys.stderr, flush=True)


def _find_cuda_home():
    """CUDA_HOME as set, else the toolkit that owns the nvcc on PATH, else /usr/local/cuda.

    torch's guess (``which nvcc``/..) yields /usr/local on machines whose nvcc is a wrapper script in
    /usr/local/bin, where neither include/ nor lib64/ hold the CUDA runtime: take the first candidate
    that has both nvcc and the runtime headers.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:  # a wrapper script on PATH may live outside the toolkit: want its headers
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and (
                os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
                or glob.glob(os.path.join(home, "targets", "*", "include", "cuda_runtime.h"))):
            return home
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _wheel_cuda_includes():
    """Include dirs of the CUDA library headers shipped inside torch's CUDA wheels (nvidia/*/include).

    A compiler-only toolkit (nvcc + cudart) lacks cuBLAS/cuSPARSE/... headers that ATen's CUDA headers
    include; the CUDA build of torch brings them under site-packages/nvidia/cu13/include (CUDA 13) or
    nvidia/<lib>/include (CUDA 12).
    """
    try:
        import nvidia  # namespace package installed with the CUDA build of torch
    except ImportError:
        return []
    dirs = []
    for base in list(getattr(nvidia, "__path__", [])):
        dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d))
    return dirs


def _want_cuda():
    if os.environ.get("STSSA_NO_CUDA", "0") == "1":
        return False, "STSSA_NO_CUDA=1"
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    nvcc = _cuda_home and os.path.exists(os.path.join(_cuda_home, "bin", "nvcc"))
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif not nvcc:
        reason = "no nvcc found (set CUDA_HOME or put nvcc on PATH)"
    else:
        return True, f"nvcc in {_cuda_home}, torch CUDA {torch.version.cuda}"
    if force:
        raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be compiled: {reason}")
    return False, reason


# The extension is written against the LibTorch stable ABI (torch/csrc/stable, torch/headeronly) and
# targets torch 2.10: the headers hide every newer API, and the binary (an abi3 module: Py_LIMITED_API,
# set by torch's BuildExtension for py_limited_api extensions) loads under any torch >= 2.10 and CPython >= 3.9.
TORCH_TARGET_VERSION = "0x020a000000000000"  # 2.10
PY_LIMITED_API_TAG = "cp39"


def _extensions():
    cpu_sources = [os.path.join("csrc", "stssa.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    target = f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"
    cxx_flags = ["-O3", target]  # the C++ standard is the one torch requires (C++17 up to 2.9, C++20 after)
    use_cuda, reason = _want_cuda()
    if not use_cuda:
        _log(f"building the CPU kernels only: {reason}")
        return [CppExtension("stssa_kernels._C", cpu_sources, include_dirs=include_dirs,
                             define_macros=[("STSSA_PYTHON_MODULE", None)], py_limited_api=True,
                             extra_compile_args={"cxx": cxx_flags})]
    archs = os.environ.get("STSSA_CUDA_ARCHS", DEFAULT_ARCHS)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs.replace(",", ";")
    _log(f"building CPU and CUDA kernels ({reason}); archs {archs}")
    nvcc_flags = ["-O3", target, "--expt-relaxed-constexpr", "-lineinfo",
                  "--resource-usage" if os.environ.get("STSSA_NVCC_VERBOSE") else ""]
    ext = CUDAExtension("stssa_kernels._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
                        define_macros=[("STSSA_WITH_CUDA", None), ("STSSA_PYTHON_MODULE", None)],
                        py_limited_api=True,
                        extra_compile_args={"cxx": cxx_flags, "nvcc": [f for f in nvcc_flags if f]})
    # Only the stable C shim (libtorch_cpu) and the CUDA runtime are used. Linking libtorch_cuda/libc10_cuda
    # would stop the module from loading under a CPU-only torch, and a shared libcudart would tie it to
    # one CUDA major version: link the runtime statically instead.
    ext.libraries = [lib for lib in ext.libraries if lib not in ("cudart", "c10_cuda", "torch_cuda")]
    ext.extra_link_args = list(ext.extra_link_args or []) + ["-l:libcudart_static.a", "-lrt", "-ldl", "-lpthread"]
    return [ext]

setup(
    name="stssa-kernels",
    version="0.1.0",
    description="Fused 3-D self-attention, temporal projections and temporally-resolved RoIAlign "
                "for video action detection (STSSA)",
    packages=find_packages(include=["stssa_kernels*", "stssa*"]),
    package_data={"stssa": ["configs/*.yaml"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API_TAG}},
    zip_safe=False,
)
