"""The Triton kernels of ``temporal_proj`` on CPU tensors under the Triton interpreter.

Run in its own process: ``TRITON_INTERPRET=1 python -m pytest -m interpret tests/test_temporal_proj_interpret.py``
(the variable must be set before triton is imported). Under the interpreter the dispatch table sends
fp32/fp16 CPU calls to the ``triton`` backend, so the public function exercises the forward, grad-x
and grad-W kernels. Tiny sizes, but chosen to cover several tiles per dimension, masked tails in every
dimension (positions, output channels, input channels), all-padding taps (T < kt) and strided input.
bf16 is not simulated by the interpreter; the GPU tests cover it.
"""
from __future__ import annotations

import pytest
import torch

from _numerics import assert_by_rule, check_against_float64
from _samples import STSSA_KT, temporal_proj_inputs as make
from _samples import layout as to_layout
from conftest import INTERPRETING

pytestmark = pytest.mark.interpret

if INTERPRETING:
    from stssa_kernels import temporal_proj
    from stssa_kernels.ops import _arch
    from stssa_kernels.ops import temporal_proj as tp_ops
    from stssa_kernels.reference import temporal_proj_ref


def check_forward(x, ws, bs):
    out = temporal_proj(x, ws, bs)
    ref = temporal_proj_ref(x.double(), [w.double() for w in ws], [b.double() if b is not None else None for b in bs])
    for i, (o, r, l) in enumerate(zip(out, ref, temporal_proj_ref(x, ws, bs))):
        assert_by_rule(o, r, l, f"out[{i}]")


def check_backward(x, ws, bs):
    """Gradients of x, every weight and every bias by the 2x rule (all outputs flattened into one)."""
    n, has_b = len(ws), [b is not None for b in bs]

    def flat(fn):
        def run(x, *params):
            it = iter(params[n:])
            out = fn(x, list(params[:n]), [next(it) if h else None for h in has_b])
            return torch.cat([o.flatten() for o in out])
        return run

    names = ["x"] + [f"weights[{i}]" for i in range(n)] + [f"biases[{i}]" for i, h in enumerate(has_b) if h]
    check_against_float64(flat(temporal_proj), flat(temporal_proj_ref), [x, *ws, *(b for b in bs if b is not None)],
                          names)


def _layouts(x):
    cl_big = torch.randn(x.shape[0], x.shape[2], x.shape[3], x.shape[4] * 2, x.shape[1], dtype=x.dtype)
    cl_sliced = cl_big[:, :, :, ::2].permute(0, 4, 1, 2, 3)  # channel stride 1, other strides odd
    cl_sliced.copy_(x)
    return {"contiguous": x, "channels_last_3d": to_layout(x, "channels_last"), "channels_last_sliced": cl_sliced}


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: avoid OpenMP hand-off costs in the references
    yield
    torch.set_num_threads(n)


def test_dispatch_uses_triton_under_interpreter():
    x, ws, _ = make()
    assert tp_ops.select(x, [4], [3]).backend == "triton"
    assert tp_ops.select(x.double(), [4], [3]).backend != "triton"  # the interpreter has no fp64 dot
    assert _arch.triton_kernels("temporal_proj").pick_config(None, 5, [4]).name == "small"


@pytest.mark.parametrize("T,kt", [(1, 7), (2, 3), (3, 7), (4, 1), (8, 7)])
def test_single_projection(T, kt):
    x, ws, bs = make(B=2, C=5, T=T, H=3, W=2, out_channels=(6,), kernel_sizes=(kt,))
    check_forward(x, ws, bs)
    check_backward(x, ws, bs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stssa_mix_multiple_tiles(dtype):
    """Three 7-tap + three 1-tap projections; widths 70 and 33 need two 64-wide tiles with masked
    tails, C=40 two 32-deep K blocks (masked), M=2*4*3*3=72 two 64-row tiles; some biases absent."""
    x, ws, bs = make(B=2, C=40, T=4, H=3, W=3, out_channels=(16, 70, 33, 16, 5, 48), kernel_sizes=STSSA_KT,
                     bias=(True, False, True, True, True, False), dtype=dtype)
    check_forward(x, ws, bs)
    check_backward(x, ws, bs)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "channels_last_sliced"])
def test_input_layouts(layout):
    """Channels-last views are read in place with their own (b, t, h, w) strides; other layouts
    through the launcher's channels-last copy."""
    x, ws, bs = make(B=1, C=6, T=5, H=3, W=4, out_channels=(4, 5), kernel_sizes=(7, 1))
    xv = _layouts(x)[layout]
    check_forward(xv, ws, bs)
    check_backward(xv, ws, bs)


def test_triton_equals_gemm_backend():
    """Same op, two backends: the kernels and the CPU GEMM path agree to fp32 rounding."""
    x, ws, bs = make(B=2, C=7, T=5, H=2, W=3, out_channels=(3, 9, 2), kernel_sizes=(3, 7, 1))
    x = x.requires_grad_()
    outs, grads = {}, {}
    for backend in ("triton", "gemm"):
        with tp_ops.DISPATCH.force(backend):
            out = temporal_proj(x, ws, bs)
            outs[backend] = out
            grads[backend] = torch.autograd.grad(sum((o * o).sum() for o in out), [x])[0]
    for a, b in zip(outs["triton"], outs["gemm"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["triton"], grads["gemm"], rtol=1e-5, atol=1e-5)


def test_strided_bias_of_a_single_projection():
    """The kernels read the packed bias at unit stride: a strided bias (a slice of a larger tensor) of a
    single projection, which pack_biases handed over as it came, was read as its storage's first
    elements (error 0.17 relative)."""
    x, ws, _ = make(C=5, T=3, H=3, W=2, out_channels=(6,), kernel_sizes=(3,))
    assert tp_ops.select(x, [6], [3]).backend == "triton"
    bias = torch.randn(12, generator=torch.Generator().manual_seed(4))[::2]
    assert bias.stride() == (2,)
    check_forward(x, ws, [bias])
    check_backward(x, ws, [bias])
