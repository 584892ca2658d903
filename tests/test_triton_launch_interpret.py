"""The Triton launchers themselves under the Triton interpreter (CPU tensors, no GPU): zero key width
through both attention kernel families, and every launch of every launcher entered under the
tensors' device context.

Own pytest process (TRITON_INTERPRET must be set before triton is imported)::

    TRITON_INTERPRET=1 python -m pytest -m interpret tests/test_triton_launch_interpret.py
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytestmark = [pytest.mark.interpret,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="needs TRITON_INTERPRET=1 set before triton is imported")]

if os.environ.get("TRITON_INTERPRET") == "1":
    from stssa_kernels.reference.attention3d import attention3d_ref
    from stssa_kernels.triton import _launch
    from stssa_kernels.triton import attention3d as TK
    from stssa_kernels.triton import temporal_proj as TP


def _run(q, k, v, r, g, axis, cc=80, grad=None):
    """Launcher forward + backward on the plan of arch ``cc``: (out, dq, dk, dv, dgamma)."""
    nseq, L = TK.seq_count_and_length(q.shape, axis)
    p = TK.plan(cc, L, q.shape[1], v.shape[1], q.dtype)
    out, lse, attn = TK.forward(q, k, v, axis, 1, 1.0, r, g, p)
    grad = torch.ones_like(out) if grad is None else grad
    dq, dk, dv, dg = TK.backward(grad, q, k, v, attn if attn is not None else out, lse, axis, 1, 1.0, g, p)
    return p, out, dq, dk, dv, dg


def _reference(q, k, v, r, g, axis, grad):
    """float64 autograd reference: (out, dv, dgamma, dresidual)."""
    q64, k64 = q.double(), k.double()
    v64, r64, g64 = (t.double().requires_grad_() for t in (v, r, g))
    out = attention3d_ref(q64, k64, v64, axis, scale=1.0, residual=r64, gamma=g64)
    out.backward(grad.double())
    return out.detach(), v64.grad, g64.grad, r64.grad


def _within(kernel, exact, same_dtype_torch):
    """The project's rule: the kernel's error <= 2x that of PyTorch computing the same in the kernel's
    dtype, plus a rounding floor of a few ulps of the result's scale."""
    eps = torch.finfo(kernel.dtype).eps
    floor = 4 * eps * max(1.0, exact.abs().max().item())
    err = (kernel.double() - exact).abs().max().item()
    ref_err = (same_dtype_torch.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + floor, (err, ref_err, floor)


# (shape [B, Dk=0, T, H, W], Dv, axis): packed on both axes, flash on the full axis (L = 75 > 64)
ZERO_DK = [((2, 0, 3, 5, 7), 6, "spatial"), ((2, 0, 5, 3, 3), 6, "temporal"), ((1, 0, 3, 5, 5), 10, "full")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,dv,axis", ZERO_DK, ids=["spatial-packed", "temporal-packed", "full-flash"])
def test_zero_key_width_is_uniform_attention(shape, dv, axis, dtype):
    # S = 0 for every pair, so out = residual + gamma * mean_j v, whatever scale (1/sqrt(0) = inf)
    gen = torch.Generator().manual_seed(7)
    B, _, T, H, W = shape
    q = torch.empty(shape, dtype=dtype)
    k = torch.empty(shape, dtype=dtype)
    v, r, grad = (torch.randn(B, dv, T, H, W, generator=gen).to(dtype) for _ in range(3))
    g = torch.tensor(0.7, dtype=torch.float32)
    p, out, dq, dk, dv_, dg = _run(q, k, v, r, g, axis, grad=grad)
    assert p.kind == ("flash" if axis == "full" else "packed")
    exact, dv64, dg64, dr64 = _reference(q, k, v, r, g, axis, grad)
    with torch.no_grad():
        same = attention3d_ref(q, k, v, axis, scale=1.0, residual=r, gamma=g.to(dtype))
    _within(out, exact, same)
    # gradients: v and gamma get the uniform-attention gradients; q and k have no channels
    vt, gt = v.clone().requires_grad_(), g.to(dtype).requires_grad_()
    attention3d_ref(q, k, vt, axis, scale=1.0, residual=r, gamma=gt).backward(grad)
    _within(dv_, dv64, vt.grad)
    assert dv_.abs().sum() > 0 and dg.abs() > 0
    _within(dg.reshape(()), dg64.reshape(()), gt.grad.reshape(()))
    assert dq.shape == q.shape and dk.shape == k.shape


def test_zero_key_width_infinite_scale_stays_finite():
    q = torch.empty(1, 0, 2, 3, 3)
    v = torch.randn(1, 4, 2, 3, 3)
    nseq, L = TK.seq_count_and_length(q.shape, "spatial")
    p = TK.plan(80, L, 0, 4, q.dtype)
    out, lse, _ = TK.forward(q, q, v, "spatial", 1, float("inf"), None, None, p)
    torch.testing.assert_close(out, v.mean((3, 4), keepdim=True).expand_as(v))
    torch.testing.assert_close(lse, torch.full_like(lse, float(torch.tensor(L).log())))


@contextlib.contextmanager
def _device_recorder(monkeypatch):
    """Replace the launchers' device context with one that records the device and whether each
    Triton launch happens inside it."""
    from triton.runtime.interpreter import InterpretedFunction

    state = {"inside": 0, "entered": [], "outside": [], "launches": 0}

    @contextlib.contextmanager
    def ctx(device):
        state["entered"].append(device)
        state["inside"] += 1
        try:
            yield
        finally:
            state["inside"] -= 1

    orig = InterpretedFunction.run

    def run(self, *args, **kwargs):
        state["launches"] += 1
        if not state["inside"]:
            state["outside"].append(self.fn.__name__)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(_launch, "device_context", ctx)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    yield state


@pytest.mark.parametrize("axis", ["spatial", "full"])
def test_attention_launches_run_under_the_tensor_device(axis, monkeypatch):
    q = torch.randn(1, 4, 3, 5, 5)
    v = torch.randn(1, 6, 3, 5, 5)
    with _device_recorder(monkeypatch) as state:
        _run(q, q, v, v.clone(), torch.tensor(0.5), axis)
    assert state["launches"] >= 2 and not state["outside"], state
    assert state["entered"] and all(d == q.device for d in state["entered"])


def test_temporal_proj_launches_run_under_the_tensor_device(monkeypatch):
    x = torch.randn(1, 8, 4, 3, 3)
    oc, ks = [4, 4], [3, 1]
    wp = torch.randn(sum(k * n for k, n in zip(ks, oc)), 8)
    cfg = TP.pick_config(None, 8, oc)
    with _device_recorder(monkeypatch) as state:
        y = TP.temporal_proj_fwd(x, wp, torch.randn(8), oc, ks, cfg)
        TP.temporal_proj_bwd(torch.randn_like(y), x, wp, oc, ks, True, True, cfg)
    assert state["launches"] == 3 and not state["outside"], state
    assert all(d == x.device for d in state["entered"])
