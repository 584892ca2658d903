"""Test-suite configuration shared by every test file: the markers (defined here, once) and the skips
they imply.

Markers:

* ``gpu``: needs a CUDA device. Selected by ``-m gpu`` (``scripts/gpu_check.sh``); skipped where
  ``torch.cuda.is_available()`` is false (the ``needs_cuda`` skip is applied to every such test).
* ``interpret``: runs Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``, which must be set
  before triton is imported, so these run in their own process (``make test-interpret``); skipped in
  any other process.
* ``slow``: longer tests (seconds to minutes).

``needs_cuda`` is also importable for a test that is not GPU-marked but needs CUDA for one parameter
(``from conftest import needs_cuda``).
"""
from __future__ import annotations

import os

import pytest
import torch

MARKERS = {
    "gpu": "needs a CUDA device (skipped without one; `-m gpu` selects the GPU checks)",
    "interpret": "Triton kernels on CPU tensors under TRITON_INTERPRET=1 (own pytest process: "
                 "`make test-interpret`; skipped elsewhere)",
    "slow": "longer tests",
}

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_needs_interpreter = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 set before triton is imported "
                                             "(run `make test-interpret`)")


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(needs_cuda)
        if item.get_closest_marker("interpret") is not None and not INTERPRETING:
            item.add_marker(_needs_interpreter)
