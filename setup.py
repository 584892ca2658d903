"""Build script for the C++/CUDA extension ``stssa_kernels._C`` (metadata lives in pyproject.toml).

``pip install -e .``, ``pip install .`` and ``pip wheel .`` build it in pip's isolated build environment
against the torch that environment gets (``torch>=2.10`` in ``build-system.requires``); the extension
targets the LibTorch stable ABI, so it also loads next to any other torch >= 2.10. Add
``--no-build-isolation`` to compile against the torch already installed (no second torch download: the
fast path ``make`` uses).

Environment variables:
  FORCE_CUDA=1          compile the CUDA kernels even without a visible GPU; fail, naming what is
                        missing (nvcc, a CUDA build of torch), if that is impossible.
  STSSA_NO_CUDA=1       never compile CUDA kernels (CPU-only extension).
  STSSA_CUDA_ARCHS      ';'-separated compute capabilities, default "7.5;8.0;8.6;8.9;9.0+PTX"
                        (7.5 = RTX Titan, the project's named target).
  MAX_JOBS              parallel compile jobs for ninja.

A set-up that cannot work stops with one line starting ``[stssa-kernels] error:`` (no traceback); a
build without CUDA kernels says why in a line starting ``[stssa-kernels] building the CPU kernels only``
(pip shows build output with ``-v``).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"
MIN_TORCH = (2, 10)


def _log(msg):
    print(f"[stssa-kernels] {msg}", file=sys.stderr, flush=True)


def _fail(msg):
    """Stop the build with one line (pip prints it as is; a traceback would bury it)."""
    print(f"[stssa-kernels] error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def _version_tuple(version):
    m = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


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


def _import_torch():
    """The torch to compile against, >= 2.10, or one line saying what is wrong."""
    need = ".".join(map(str, MIN_TORCH))
    try:
        import torch
    except ImportError as e:
        _fail(f"stssa-kernels needs torch >= {need} to build, and torch does not import here ({e}); "
              "install torch into this environment first, or drop --no-build-isolation so that pip "
              "builds in an isolated environment holding torch")
    if _version_tuple(torch.__version__) < MIN_TORCH:
        _fail(f"stssa-kernels needs torch >= {need}, found {torch.__version__} "
              f"(at {os.path.dirname(torch.__file__)}); upgrade torch")
    return torch


torch = _import_torch()
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _nvcc_release(nvcc):
    """(major, minor) of ``nvcc --version``, or None if it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _want_cuda():
    """(compile the CUDA kernels?, why): every reason a CUDA build is impossible is named."""
    if os.environ.get("STSSA_NO_CUDA", "0") == "1":
        return False, "STSSA_NO_CUDA=1"
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU-only build (a CUDA build of torch is needed)")
    nvcc = os.path.join(_cuda_home, "bin", "nvcc") if _cuda_home else None
    if not (nvcc and os.path.exists(nvcc)):
        where = f"CUDA_HOME={os.environ['CUDA_HOME']}" if os.environ.get("CUDA_HOME") else \
            "PATH, /usr/local/cuda"
        missing.append(f"no nvcc found (looked in {where}; install the CUDA toolkit or set CUDA_HOME)")
    elif torch.version.cuda is not None:
        release = _nvcc_release(nvcc)
        if release is None:
            missing.append(f"{nvcc} --version does not run")
        elif release[0] != _version_tuple(torch.version.cuda)[0]:
            missing.append(f"nvcc is CUDA {release[0]}.{release[1]} but torch {torch.__version__} was built "
                           f"with CUDA {torch.version.cuda} (the major versions must match)")
    if not missing:
        return True, f"nvcc in {_cuda_home}, torch CUDA {torch.version.cuda}"
    reason = "; ".join(missing)
    if force:
        _fail(f"FORCE_CUDA=1 but the CUDA kernels cannot be compiled: {reason}")
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

# Name, version, dependencies and packages are in pyproject.toml.
setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API_TAG}},
)
