"""Smoke test of an installed stssa-kernels: every op, forward and backward, on CPU, against float64 ground truth.

Needs only the package and its runtime dependencies (no pytest, no torchvision, no triton), so it runs in
a fresh venv right after ``pip install``: ``python scripts/smoke_ops.py [--expect-under DIR]``. Prints one
line per check and exits non-zero on the first failure. ``--expect-under`` checks that ``stssa_kernels``
was imported from DIR (the editable source tree or a venv's site-packages), not from somewhere else on
``sys.path``.

Tolerance rule (as in the test suite): the op's error against float64 ground truth is at most twice the
error of the same computation done by plain PyTorch in the op's precision, plus a rounding floor.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check(name: str, got: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor | None = None,
           terms: int = 1, scale: float = 1.0) -> None:
    """got vs truth within 2x baseline's error (baseline: PyTorch in got's precision) + a rounding floor.

    The floor is the worst-case rounding of a sum of ``terms`` products of magnitude up to ``scale``
    (8 eps per term), at least that of the result itself.
    """
    eps = torch.finfo(got.dtype).eps
    floor = 8 * eps * max(truth.abs().max().item(), 1.0, terms * scale)
    allowed = floor + (2 * _err(baseline, truth) if baseline is not None else 0.0)
    err = _err(got, truth)
    status = "ok" if err <= allowed and got.shape == truth.shape else "FAIL"
    print(f"{status:4} {name}: max error {err:.3g} (allowed {allowed:.3g}), shape {tuple(got.shape)}", flush=True)
    if status != "ok":
        raise SystemExit(f"smoke test failed: {name}")


def _bilinear_truth(a: float, b: float, c: float, boxes: torch.Tensor, t: int, ph: int, pw: int,
                    aligned: bool) -> torch.Tensor:
    """roi_align of the plane f(y, x) = a*y + b*x + c: every bin averages samples placed symmetrically
    about its centre, and bilinear interpolation is exact on a plane, so each bin equals f(bin centre)."""
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, i, None, None] - off for i in range(1, 5))
    iy = (torch.arange(ph, dtype=torch.float64)[:, None] + 0.5) / ph
    ix = (torch.arange(pw, dtype=torch.float64)[None, :] + 0.5) / pw
    out = a * (y1 + iy * (y2 - y1)) + b * (x1 + ix * (x2 - x1)) + c     # [K, ph, pw]
    return out[:, None, None].expand(-1, 1, t, ph, pw)


def smoke_roi_align3d(sk) -> None:
    n, c, t, h, w, ph, pw = 2, 3, 4, 9, 11, 3, 2
    a, b, k0 = 0.7, -0.3, 2.0
    ys = torch.arange(h, dtype=torch.float64)[:, None]
    xs = torch.arange(w, dtype=torch.float64)[None, :]
    plane = (a * ys + b * xs + k0).expand(n, c, t, h, w).contiguous()
    # Boxes well inside the image, so no sample is clamped at the border.
    boxes = torch.tensor([[0, 1.0, 1.5, 8.0, 6.0], [1, 2.25, 0.5, 5.5, 7.0], [1, 3.0, 3.0, 4.0, 4.5]],
                         dtype=torch.float64)
    for aligned in (False, True):
        truth = _bilinear_truth(a, b, k0, boxes, t, ph, pw, aligned).expand(-1, c, -1, -1, -1)
        for dtype in (torch.float64, torch.float32):
            got = sk.roi_align3d(plane.to(dtype), boxes, (ph, pw), 1.0, 2, aligned)
            _check(f"roi_align3d forward {str(dtype)[6:]} aligned={aligned}", got, truth)
    # Backward: each output element spreads weight 1 over its samples inside the image, so the input
    # gradient of sum(output) holds K*C*T*ph*pw in total, and it lies only in the boxes' batch images.
    x = plane.clone().requires_grad_(True)
    sk.roi_align3d(x, boxes, (ph, pw), 1.0, 2, True).sum().backward()
    total = torch.tensor([float(boxes.size(0) * c * t * ph * pw)], dtype=torch.float64)
    _check("roi_align3d backward (gradient mass)", x.grad.sum().reshape(1), total, terms=x.numel())
    per_image = x.grad.sum(dim=(1, 2, 3, 4))
    _check("roi_align3d backward (per batch image)", per_image,
           torch.tensor([1.0 * c * t * ph * pw, 2.0 * c * t * ph * pw], dtype=torch.float64), terms=x[0].numel())


def smoke_temporal_proj(sk) -> None:
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(2, 6, 5, 3, 4, generator=g, dtype=torch.float64)
    w64 = [torch.randn(4, 6, 3, 1, 1, generator=g, dtype=torch.float64),
           torch.randn(5, 6, 1, 1, 1, generator=g, dtype=torch.float64)]
    b64 = [torch.randn(4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]

    def conv(x, ws, bs):
        return [F.conv3d(x, wi, bi, padding=(wi.shape[2] // 2, 0, 0)) for wi, bi in zip(ws, bs)]

    truth = conv(x64, w64, b64)
    base32 = conv(x64.float(), [w.float() for w in w64], [b.float() for b in b64])
    for dtype in (torch.float64, torch.float32):
        outs = sk.temporal_proj(x64.to(dtype), [w.to(dtype) for w in w64], [b.to(dtype) for b in b64])
        for i, (o, r, base) in enumerate(zip(outs, truth, base32)):
            _check(f"temporal_proj forward {str(dtype)[6:]} output {i}", o, r,
                   base if dtype == torch.float32 else None)
    leaves = [x64.clone().requires_grad_(True)] + [w.clone().requires_grad_(True) for w in w64]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    gys = [torch.randn_like(r) for r in truth]
    got = torch.autograd.grad(sk.temporal_proj(leaves[0], leaves[1:], b64), leaves, gys)
    want = torch.autograd.grad(conv(ref_leaves[0], ref_leaves[1:], b64), ref_leaves, gys)
    for name, gg, ww in zip(("x", "weights[0]", "weights[1]"), got, want):
        _check(f"temporal_proj backward float64 d{name}", gg, ww)


def smoke_attention3d(sk) -> None:
    from stssa_kernels.reference import attention3d_ref

    g = torch.Generator().manual_seed(1)
    b, dk, dv, t, h, w = 2, 4, 6, 3, 5, 7   # odd sizes: sequences of 35 (spatial), 3 (temporal), 105 (full)
    q, k, v, res = (torch.randn(b, d, t, h, w, generator=g, dtype=torch.float64) for d in (dk, dk, dv, dv))
    gamma = torch.tensor(0.75, dtype=torch.float64)
    for axis in ("spatial", "temporal", "full"):
        truth = attention3d_ref(q, k, v, axis, heads=2, residual=res, gamma=gamma)
        base32 = attention3d_ref(*(x.float() for x in (q, k, v)), axis, heads=2, residual=res.float(),
                                 gamma=gamma.float())
        for dtype in (torch.float64, torch.float32):
            got = sk.attention3d(*(x.to(dtype) for x in (q, k, v)), axis, heads=2, residual=res.to(dtype),
                                 gamma=gamma.to(dtype))
            _check(f"attention3d forward {str(dtype)[6:]} axis={axis}", got, truth,
                   base32 if dtype == torch.float32 else None)
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, res, gamma)]
        ref_leaves = [x.clone().requires_grad_(True) for x in (q, k, v, res, gamma)]
        gy = torch.randn(truth.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(sk.attention3d(*leaves[:3], axis, heads=2, residual=leaves[3], gamma=leaves[4]),
                                  leaves, gy)
        want = torch.autograd.grad(attention3d_ref(*ref_leaves[:3], axis, heads=2, residual=ref_leaves[3],
                                                   gamma=ref_leaves[4]), ref_leaves, gy)
        # d(gamma) sums gy * attention over every output element: its floor is that sum's rounding.
        attn_scale = (gy.abs().max() * v.abs().max()).item()
        for name, gg, ww in zip(("q", "k", "v", "residual", "gamma"), got, want):
            terms = gy.numel() if name == "gamma" else 1
            _check(f"attention3d backward float64 axis={axis} d{name}", gg, ww, terms=terms, scale=attn_scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--expect-under", help="fail unless stssa_kernels is imported from this directory")
    args = ap.parse_args()
    torch.manual_seed(0)
    import stssa_kernels as sk
    # The model layer with its runtime dependencies, and a config shipped as package data.
    import stssa.data  # noqa: F401
    import stssa.evaluate  # noqa: F401
    import stssa.train  # noqa: F401
    from stssa.models import build_model
    from stssa.utils import load_config

    where = os.path.dirname(os.path.abspath(sk.__file__))
    print(f"stssa_kernels {sk.__version__} from {where}; torch {torch.__version__}; build {sk.BUILD_INFO}; "
          f"triton imported: {'triton' in sys.modules}", flush=True)
    if args.expect_under:
        root = os.path.realpath(args.expect_under)
        if not os.path.realpath(where).startswith(root + os.sep):
            raise SystemExit(f"smoke test failed: stssa_kernels comes from {where}, not from under {root}")
    for op in ("roi_align3d", "temporal_proj", "attention3d"):
        if not hasattr(torch.ops.stssa, op):
            raise SystemExit(f"smoke test failed: torch.ops.stssa.{op} is not registered")
    cfg = load_config("demo_tiny")
    model = build_model(cfg["model"], load_pretrained=False)
    print(f"ok   stssa: packaged config demo_tiny loads, {type(model).__name__} builds "
          f"({sum(p.numel() for p in model.parameters())} parameters)", flush=True)
    smoke_roi_align3d(sk)
    smoke_temporal_proj(sk)
    smoke_attention3d(sk)
    print("smoke test: every op ok", flush=True)


if __name__ == "__main__":
    main()
