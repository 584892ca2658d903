"""Loads the compiled extension, whose static initialisers register the C++ schemas and kernels."""
import re

import torch  # first: _C links against libtorch/libc10, which importing torch loads

_found = re.match(r"(\d+)\.(\d+)", torch.__version__)
if _found is None or (int(_found.group(1)), int(_found.group(2))) < (2, 10):  # the stable ABI's floor
    raise ImportError(f"stssa-kernels needs torch >= 2.10, found {torch.__version__}")

try:
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "stssa_kernels: the compiled extension stssa_kernels._C is missing or does not load "
        f"({e}). Build it with `pip install -e .` (or `make build`); the build is an abi3 module for the "
        "LibTorch stable ABI and loads under any torch >= 2.10."
    ) from e

BUILD_INFO = torch.ops.stssa._build_info()
#: True when the CUDA kernels were compiled into the extension.
HAS_CUDA_KERNELS = "cuda=1" in BUILD_INFO
