"""Triton launchers run under the CUDA device of their tensors (not the current device).

CPU side: fake CUDA tensors on ``cuda:1`` (no GPU needed) go through the real launchers with
``torch.cuda.device`` replaced by a recorder and the kernel launches recorded, not run. GPU side (two
devices): the ops on ``cuda:1`` while the current device is ``cuda:0`` give the CPU float64 result.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

triton = pytest.importorskip("triton")

from stssa_kernels.triton import _launch  # noqa: E402
from stssa_kernels.triton import attention3d as TK  # noqa: E402
from stssa_kernels.triton import temporal_proj as TP  # noqa: E402


class _DeviceRecorder:
    """Stands in for ``torch.cuda.device``: records the device entered and how deep we are."""
    stack: list = []
    entered: list = []

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        type(self).entered.append(self.device)
        type(self).stack.append(self.device)

    def __exit__(self, *exc):
        type(self).stack.pop()


@pytest.fixture
def recorder(monkeypatch):
    _DeviceRecorder.stack, _DeviceRecorder.entered = [], []
    monkeypatch.setattr(torch.cuda, "device", _DeviceRecorder)
    launches_at = []  # the device context each launch ran under

    def run(self, *args, grid=None, warmup=False, **kwargs):
        launches_at.append((self.fn.__name__, list(_DeviceRecorder.stack)))

    from triton.runtime.jit import JITFunction
    monkeypatch.setattr(JITFunction, "run", run)
    yield launches_at
    TP._tables.cache_clear()  # it may hold fake tensors now


def _check(launches_at, device):
    assert launches_at, "no launch recorded"
    for name, stack in launches_at:
        assert stack == [device], (name, stack)
    assert set(_DeviceRecorder.entered) == {device}


def test_device_context_of_a_cuda_device_is_that_device():
    ctx = _launch.device_context(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert not isinstance(_launch.device_context(torch.device("cpu")), torch.cuda.device)


@pytest.mark.parametrize("axis,shape", [("spatial", (2, 8, 3, 7, 7)), ("full", (1, 8, 3, 5, 5))])
def test_attention_launchers_enter_the_tensor_device(recorder, axis, shape):
    dev = torch.device("cuda", 1)
    with FakeTensorMode(allow_non_fake_inputs=False):
        q = torch.empty(shape, device=dev, dtype=torch.float16)
        v = torch.empty((shape[0], 16) + shape[2:], device=dev, dtype=torch.float16)
        g = torch.zeros((), device=dev)
        nseq, L = TK.seq_count_and_length(shape, axis)
        p = TK.plan(90, L, shape[1], 16, q.dtype)
        out, lse, attn = TK.forward(q, q, v, axis, 1, 0.3, v, g, p)
        TK.backward(out, q, q, v, attn if attn is not None else out, lse, axis, 1, 0.3, g, p)
    _check(recorder, dev)
    assert len(recorder) == (2 if p.kind == "packed" else 4)


def test_temporal_proj_launchers_enter_the_tensor_device(recorder):
    dev = torch.device("cuda", 1)
    oc, ks = [32, 16], [3, 1]
    with FakeTensorMode(allow_non_fake_inputs=False):
        x = torch.empty(2, 32, 4, 7, 7, device=dev, dtype=torch.bfloat16)
        wp = torch.empty(3 * 32 + 16, 32, device=dev, dtype=torch.bfloat16)
        cfg = TP.pick_config(90, 32, oc)
        y = TP.temporal_proj_fwd(x, wp, None, oc, ks, cfg)
        TP.temporal_proj_bwd(y, x, wp, oc, ks, True, True, cfg)
    _check(recorder, dev)
    assert len(recorder) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("axis", ["spatial", "temporal", "full"])
def test_ops_on_the_second_gpu_without_set_device(axis):
    # the same deterministic kernels on cuda:1 (current device cuda:0) and on cuda:0: equal bit for bit
    import stssa_kernels

    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 4, 7, 7, generator=gen)
    ws = [torch.randn(32, 32, kt, 1, 1, generator=gen) * 0.1 for kt in (3, 3, 1)]
    g = torch.tensor(0.5)

    def run(dev):
        xd = x.to(dev, torch.bfloat16).requires_grad_()
        wd = [w.to(dev, torch.bfloat16).requires_grad_() for w in ws]
        gd = g.to(dev).requires_grad_()
        q, k, v = stssa_kernels.temporal_proj(xd, wd)
        out = stssa_kernels.attention3d(q, k, v, axis, residual=xd, gamma=gd)
        out.float().square().sum().backward()
        assert out.device == torch.device(dev)
        return [t.detach().cpu() for t in (out, xd.grad, gd.grad, *(w.grad for w in wd))]

    on0, on1 = run("cuda:0"), run("cuda:1")
    assert torch.cuda.current_device() == 0
    for a, b in zip(on0, on1):
        assert torch.equal(a, b)
