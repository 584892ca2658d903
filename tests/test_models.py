"""Tests of stssa.models: backbone layout and shapes, every named config (shapes and gradients),
fused-vs-reference equivalence of the heads, pretrained-checkpoint key mapping."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from stssa.models import (CheckpointShapeError, I3D, I3DConfig, STSSAHead, BaselineHead, build_head, build_model,
                          load_backbone)
from _numerics import assert_by_rule
from stssa.models.ops import available
from stssa.utils import CONFIG_DIR, load_config

ABLATION_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")
                          if p.stem.startswith(("stssa_", "baseline_")))
TINY_BACKBONE = {"depths": [1, 1, 1, 1], "width": 4}
FUSED_STSSA = available("attention3d", True) and available("temporal_proj", True)

# The reference path (use_fused=False) pools RoIs with torchvision, which a CPU-only torch may lack.
needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="the reference path needs torchvision, which is not installed")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster, and immune to OpenMP spin-waiting when the
    two cores are shared (measured 70x slower with 2 threads on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rois(n_clips: int, k: int, size: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    xy = torch.rand(k, 2, generator=gen) * size * 0.6
    wh = 2 + torch.rand(k, 2, generator=gen) * size * 0.4
    b = torch.randint(0, n_clips, (k, 1), generator=gen).to(torch.float32)
    return torch.cat([b, xy, xy + wh], 1).to(dtype)


def _tiny(model_cfg: dict, embed_dim: int = 8) -> dict:
    """The named config's head on a tiny backbone (channels 4*8*4 = 128), Q/K width ``embed_dim``."""
    cfg = copy.deepcopy(model_cfg)
    cfg["backbone"] = {**cfg["backbone"], **TINY_BACKBONE, "freeze_bn": False}
    cfg.pop("pretrained", None)
    if cfg["head"].get("type") == "stssa":
        cfg["head"]["embed_dim"] = embed_dim
    return cfg


def _randomise_gammas(model: torch.nn.Module, gen: torch.Generator) -> None:
    """gamma starts at 0 (identity blocks, zero Q/K/V gradients); tests need the attention to count."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.copy_(0.5 + torch.rand((), generator=gen))


# --------------------------------------------------------------------------------------------- backbone
def test_i3d_r50_layout_matches_the_paper():
    """The AVA I3D-R50: conv1 5x7x7, temporal kernels per block, res5 dilation 2, 32x256x256 -> 16x16x16."""
    with torch.device("meta"):
        net = I3D(I3DConfig())
        out = net(torch.empty(1, 3, 32, 256, 256))
    assert tuple(out.shape) == (1, 2048, 16, 16, 16)
    assert tuple(net.stem.conv.weight.shape) == (64, 3, 5, 7, 7)
    kts = {s: [b.conv_a.kernel_size[0] for b in getattr(net, s)] for s in ("res2", "res3", "res4", "res5")}
    assert kts == {"res2": [3, 3, 3], "res3": [3, 1, 3, 1], "res4": [3, 1, 3, 1, 3, 1], "res5": [1, 3, 1]}
    assert all(b.conv_b.dilation == (1, 2, 2) and b.conv_b.stride == (1, 1, 1) for b in net.res5)
    assert net.res3[0].conv_b.stride == (1, 2, 2) and net.res4[0].conv_b.stride == (1, 2, 2)
    assert isinstance(net.pool, torch.nn.MaxPool3d) and net.pool.kernel_size == (2, 1, 1)
    # ResNet-50 I3D without head: 27.2M parameters (PySlowFast/PyTorchVideo i3d_r50 minus the 2048x400 fc).
    assert sum(p.numel() for p in net.parameters()) == 27_223_872


def test_tiny_backbone_forward_backward_and_freeze_bn():
    gen = torch.Generator().manual_seed(0)
    net = I3D(I3DConfig(depths=[1, 2, 1, 1], width=4))
    x = torch.randn(2, 3, 4, 32, 48, generator=gen)
    y = net(x)
    assert tuple(y.shape) == (2, 128, 2, 2, 3)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())

    frozen = I3D(I3DConfig(depths=[1, 1, 1, 1], width=4, freeze_bn=True)).train()
    assert all(not m.training for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm3d))
    assert all(not p.requires_grad for n, p in frozen.named_parameters() if ".bn" in n or "bn_" in n)
    with pytest.raises(ValueError, match="clips must be"):
        net(torch.randn(2, 4, 4, 32, 32))
    with pytest.raises(ValueError, match="unknown keys"):
        I3DConfig.from_dict({"depth": [3, 4, 6, 3]})


# ------------------------------------------------------------------------------------- named configs
@needs_torchvision
def test_full_detector_shapes_at_paper_size():
    """The full model of the paper (I3D-R50 + 2-layer STSSA head, 2048-d) at 32x256x256, on the meta device."""
    cfg = load_config("stssa_ssfa_tsfa_gap2048_2l_ln")
    with torch.device("meta"):
        model = build_model(cfg["model"], use_fused=False, load_pretrained=False)
        logits = model(torch.empty(2, 3, 32, 256, 256), torch.empty(5, 5))
    assert tuple(logits.shape) == (5, 80)


@pytest.mark.parametrize("name", ABLATION_CONFIGS)
@needs_torchvision
def test_named_config_full_shapes(name):
    """Every ablation config's head at the paper's shapes (res5 map [2, 2048, 16, 16, 16], stride 16) on
    the meta device (no memory, no compute)."""
    cfg = load_config(name)
    with torch.device("meta"):
        head = build_head(cfg["model"]["head"], 2048, 1 / 16, 80, use_fused=False)
        logits = head(torch.empty(2, 2048, 16, 16, 16), torch.empty(5, 5))
    assert tuple(logits.shape) == (5, 80)
    spec = cfg["model"]["head"]
    if spec["type"] == "stssa":
        assert isinstance(head, STSSAHead)
        assert len(head.blocks) == spec["num_layers"] * len(spec["axes"])
        assert [b.axis for b in head.blocks[:len(spec["axes"])]] == spec["axes"]
        q = head.blocks[0].proj["slow"]["q"]
        assert tuple(q.weight.shape) == (spec["embed_dim"], 2048, 7, 1, 1)
        assert tuple(head.blocks[0].proj["fast"]["v"].weight.shape) == (2048, 2048, 1, 1, 1)
        assert head.pool == spec["pool"]
        assert all((b.norm is not None) == spec["layernorm"] for b in head.blocks)
    else:
        assert isinstance(head, BaselineHead) and head.pool == "max"


@pytest.mark.parametrize("name", ABLATION_CONFIGS)
def test_named_config_tiny_forward_backward(name):
    """Each config's head on a tiny backbone: real forward + backward; every trainable parameter gets a
    finite gradient, non-zero once gamma != 0."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = build_model(_tiny(load_config(name)["model"]), use_fused=FUSED_STSSA, load_pretrained=False)
    _randomise_gammas(model, gen)
    clips = torch.randn(2, 3, 8, 64, 64, generator=gen)
    rois = _rois(2, 3, 64, gen)
    logits = model(clips, rois)
    assert tuple(logits.shape) == (3, 80) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.rand(3, 80, generator=gen)).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        if n.startswith("head."):
            assert p.grad.abs().sum() > 0, n


@needs_torchvision
def test_gamma_zero_makes_the_attention_blocks_identity():
    gen = torch.Generator().manual_seed(2)
    head = STSSAHead(16, axes=("spatial", "temporal"), num_layers=2, embed_dim=8, use_fused=False).eval()
    feats = torch.randn(2, 16, 4, 5, 5, generator=gen)
    x = head.roi_features(feats, _rois(2, 3, 80, gen))
    y = x
    for b in head.blocks:
        y = b(y)
    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_zero_init_last_bn_option_and_block_branches():
    on = I3D(I3DConfig.from_dict(TINY_BACKBONE))
    off = I3D(I3DConfig.from_dict({**TINY_BACKBONE, "zero_init_last_bn": False}))
    for name in ("res2", "res3", "res4", "res5"):
        assert torch.equal(getattr(on, name)[0].bn_c.weight, torch.zeros_like(getattr(on, name)[0].bn_c.weight))
        assert torch.equal(getattr(off, name)[0].bn_c.weight, torch.ones_like(getattr(off, name)[0].bn_c.weight))
    block = off.res3[0].eval()
    x = torch.randn(2, block.conv_a.in_channels, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y, ident = block.branches(x)
    torch.testing.assert_close(block(x), torch.relu(y + ident), rtol=0, atol=0)
    assert y.norm() > 0.1 * ident.norm()  # a live residual branch at initialisation


@pytest.mark.parametrize("fused", ([True] if FUSED_STSSA else []) + [pytest.param(False, marks=needs_torchvision)])
def test_forward_rois_is_forward_after_roi_features(fused):
    """The ablation trains heads on cached ``roi_features``: ``forward_rois`` must give ``forward``'s logits;
    for the baseline the temporal mean of the 3-D RoIAlign is the 2-D RoIAlign of the temporal mean."""
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 16, 5, 7, 9, generator=gen, dtype=torch.float64)
    rois = _rois(2, 6, 100, gen, torch.float64)
    for head in (STSSAHead(16, num_layers=1, embed_dim=8, layernorm=True, use_fused=fused),
                 BaselineHead(16, pool="max", use_fused=fused), BaselineHead(16, pool="avg", use_fused=fused)):
        head = head.double().eval()
        _randomise_gammas(head, gen)
        torch.testing.assert_close(head.forward_rois(head.roi_features(feats, rois)), head(feats, rois),
                                   rtol=1e-12, atol=1e-13)


@needs_torchvision
def test_head_scale_gamma_init_and_norm_position_keys():
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 16, 4, 6, 6, generator=gen, dtype=torch.float64)
    rois = _rois(2, 3, 90, gen, torch.float64)
    kw = {"axes": ("spatial",), "num_layers": 1, "embed_dim": 8, "use_fused": False}
    torch.manual_seed(0)
    default = STSSAHead(16, gamma_init=0.7, **kw).double().eval()
    torch.manual_seed(0)
    unscaled = STSSAHead(16, gamma_init=0.7, scale=1.0, **kw).double().eval()
    assert all(float(g.detach()) == pytest.approx(0.7) for b in default.blocks for g in b.gamma.values())
    x = default.roi_features(feats, rois)
    # scale=1.0 is SAGAN's softmax(q k) v; the default divides the logits by sqrt(embed_dim).
    blk = unscaled.blocks[0]
    convs = blk._convs()
    qkv = [torch.nn.functional.conv3d(x, c.weight, c.bias, padding=c.padding) for c in convs]
    want = x
    for i, b in enumerate(blk.branches):
        q, k, v = (t.flatten(3).permute(0, 2, 3, 1) for t in qkv[3 * i: 3 * i + 3])  # [K, T, HW, d]
        att = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        want = want + blk.gamma[b] * att.permute(0, 3, 1, 2).reshape(x.shape)
    torch.testing.assert_close(blk(x), want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(default.blocks[0](x), want)
    # pre-norm: the LayerNorm feeds Q/K/V only, the residual stream is not normalised.
    torch.manual_seed(0)
    pre = STSSAHead(16, layernorm=True, norm_position="pre", **kw).double().eval()
    with torch.no_grad():
        for g in pre.blocks[0].gamma.values():
            g.zero_()
    torch.testing.assert_close(pre.blocks[0](x), x, rtol=0, atol=0)
    for bad, match in (({"norm_position": "mid"}, "norm_position"), ({"scale": 0.0}, "scale")):
        with pytest.raises(ValueError, match=match):
            STSSAHead(16, **bad)
    head = build_head({"type": "stssa", "scale": 1.0, "gamma_init": 0.1, "norm_position": "pre", "layernorm": True},
                      16, 1 / 16, 80, use_fused=False)
    assert head.blocks[0].scale == 1.0 and head.blocks[0].norm_position == "pre"


def test_head_config_errors():
    with pytest.raises(ValueError, match="pool"):
        STSSAHead(16, pool="sum")
    with pytest.raises(ValueError, match="axes"):
        STSSAHead(16, axes=("full",))
    with pytest.raises(ValueError, match="unknown keys"):
        build_model({"backbone": TINY_BACKBONE, "head": {"type": "stssa", "embeddim": 8}})
    with pytest.raises(ValueError, match="head.type"):
        build_model({"backbone": TINY_BACKBONE, "head": {"type": "transformer"}})
    with pytest.raises(ValueError, match="rois must be"):
        build_model({"backbone": TINY_BACKBONE, "head": {"type": "baseline"}})(
            torch.randn(1, 3, 4, 32, 32), torch.zeros(2, 4))


# ---------------------------------------------------------------------------- fused vs reference path
def _fused_vs_reference(model_cfg: dict, dtype: torch.dtype, seed: int, device: str = "cpu", amp=None):
    """Outputs and gradients of the same parameters through the fused ops and through the reference
    (``amp``: run both under autocast to that dtype on ``device``)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(model_cfg, use_fused=True, load_pretrained=False).to(dtype).eval()
    _randomise_gammas(model, gen)
    model.to(device)
    clips = torch.randn(2, 3, 8, 64, 80, generator=gen, dtype=dtype).to(device)
    rois = _rois(2, 5, 64, gen, dtype).to(device)
    results = {}
    for fused in (True, False):
        model.set_fused(fused)
        model.zero_grad(set_to_none=True)
        # PyTorch's result on CPU bf16 with oneDNN off: oneDNN's bf16 conv3d weight gradient is NaN where
        # kt > T (the head's 7-tap projections at T = 2), which would make the rule's baseline NaN
        onednn = not (device == "cpu" and amp == torch.bfloat16 and not fused)
        with torch.backends.mkldnn.flags(enabled=onednn):
            with torch.autocast(device, dtype=amp or torch.bfloat16, enabled=amp is not None):
                out = model(clips, rois)
            out = out.to(dtype)
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype, device=device).reshape(out.shape))
        results[fused] = (out.detach().cpu(), {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()})
    return results


def _assert_within(err_fused: float, err_torch: float, what: str, floor: float) -> None:
    assert err_fused <= 2 * err_torch + floor, f"{what}: fused error {err_fused:.3g} > 2 x PyTorch's {err_torch:.3g} + {floor:g}"


STSSA_HEADS = [
    {"type": "stssa", "axes": ["spatial", "temporal"], "num_layers": 2, "embed_dim": 8, "layernorm": True, "pool": "avg"},
    {"type": "stssa", "axes": ["temporal"], "num_layers": 1, "embed_dim": 16, "pool": "max", "heads": 2},
    {"type": "stssa", "axes": ["spatial", "temporal"], "num_layers": 1, "embed_dim": 8, "layernorm": True,
     "norm_position": "pre", "scale": 1.0, "pool": "avg"},
]


@pytest.mark.skipif(not FUSED_STSSA, reason="stssa_kernels.attention3d / temporal_proj are not in this build")
@pytest.mark.parametrize("head", STSSA_HEADS)
@needs_torchvision
def test_stssa_fused_matches_reference_float64_forward(head):
    r = _fused_vs_reference({"backbone": TINY_BACKBONE, "head": head}, torch.float64, seed=3)
    torch.testing.assert_close(r[True][0], r[False][0], rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not FUSED_STSSA, reason="stssa_kernels.attention3d / temporal_proj are not in this build")
@pytest.mark.parametrize("head", STSSA_HEADS)
@needs_torchvision
def test_stssa_fused_matches_reference_float64_gradients(head):
    r = _fused_vs_reference({"backbone": TINY_BACKBONE, "head": head}, torch.float64, seed=3)
    for n in r[False][1]:
        torch.testing.assert_close(r[True][1][n], r[False][1][n], rtol=1e-10, atol=1e-13, msg=n)


def _check_error_rule(cfg: dict, seed: int, device: str = "cpu", amp=None) -> None:
    """Fused vs the fp64 reference, against the reference in the same precision vs fp64 (the 2x rule):
    logits and the head's gradients; fp32 on ``device``, under autocast to ``amp`` when given."""
    run = _fused_vs_reference(cfg, torch.float32, seed=seed, device=device, amp=amp)
    r64 = _fused_vs_reference(cfg, torch.float64, seed=seed)
    eps = torch.finfo(amp or torch.float32).eps
    truth_out = r64[False][0]
    e_f = (run[True][0].double() - truth_out).abs().max().item()
    e_t = (run[False][0].double() - truth_out).abs().max().item()
    _assert_within(e_f, e_t, "logits", 8 * eps * truth_out.abs().max().item())
    # Rounding floor for the gradients: rounding at the scale of the head's gradients. Some are exactly
    # zero in exact arithmetic (the K bias: softmax is invariant to it), so a per-tensor relative floor
    # would demand less than one rounding of the terms that cancel.
    head = {n: g for n, g in r64[False][1].items() if n.startswith("head.")}
    scale = max(g.abs().max().item() for g in head.values())
    for n, g in head.items():
        e_f = (run[True][1][n].double() - g).abs().max().item()
        e_t = (run[False][1][n].double() - g).abs().max().item()
        _assert_within(e_f, e_t, n, 8 * eps * scale)


STSSA_2L = {"backbone": TINY_BACKBONE, "head": {"type": "stssa", "axes": ["spatial", "temporal"], "num_layers": 2,
                                              "embed_dim": 8, "layernorm": True}}


@pytest.mark.skipif(not FUSED_STSSA, reason="stssa_kernels.attention3d / temporal_proj are not in this build")
@needs_torchvision
def test_stssa_fused_float32_error_within_rule():
    """fp32 fused vs fp64 reference, against fp32 reference vs fp64 reference (the 2x rule)."""
    _check_error_rule(STSSA_2L, seed=4)


@pytest.mark.skipif(not FUSED_STSSA, reason="stssa_kernels.attention3d / temporal_proj are not in this build")
@needs_torchvision
def test_stssa_fused_cpu_bf16_autocast_error_within_rule():
    _check_error_rule(STSSA_2L, seed=6, amp=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and FUSED_STSSA), reason="needs a CUDA device")
@needs_torchvision  # the reference path pools RoIs with torchvision
@pytest.mark.parametrize("amp", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("embed_dim", [8, 64])  # 64: head dims the Triton kernels take (16-aligned)
def test_gpu_stssa_fused_error_within_rule(amp, embed_dim):
    if amp == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    cfg = {"backbone": TINY_BACKBONE, "head": {**STSSA_2L["head"], "embed_dim": embed_dim}}
    _check_error_rule(cfg, seed=7, device="cuda", amp=amp)


@pytest.mark.parametrize("fused", [True, False] if FUSED_STSSA else [False])
@needs_torchvision
def test_recompute_gives_the_same_outputs_and_gradients(fused):
    """``recompute`` (activation checkpointing of each block's projections + attention) changes what is
    kept for the backward, not the numbers."""
    cfg = {"backbone": TINY_BACKBONE, "head": {**STSSA_2L["head"], "recompute": False}}
    runs = []
    for recompute in (False, True):
        cfg["head"]["recompute"] = recompute
        gen = torch.Generator().manual_seed(9)
        torch.manual_seed(9)
        model = build_model(cfg, use_fused=fused, load_pretrained=False).double().eval()
        _randomise_gammas(model, gen)
        clips = torch.randn(2, 3, 8, 64, 80, generator=gen, dtype=torch.float64)
        out = model(clips, _rois(2, 5, 64, gen, torch.float64))
        out.sum().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    for n in runs[0][1]:
        torch.testing.assert_close(runs[0][1][n], runs[1][1][n], rtol=1e-12, atol=1e-14, msg=n)


@needs_torchvision
def test_baseline_fused_matches_reference_float64():
    """The baseline head's two paths (roi_align3d on the T=1 mean vs torchvision roi_align)."""
    r = _fused_vs_reference({"backbone": TINY_BACKBONE, "head": {"type": "baseline"}}, torch.float64, seed=5)
    torch.testing.assert_close(r[True][0], r[False][0], rtol=1e-10, atol=1e-12)
    for n in r[False][1]:
        torch.testing.assert_close(r[True][1][n], r[False][1][n], rtol=1e-9, atol=1e-12, msg=n)


@needs_torchvision
def test_stssa_reference_gradcheck_float64():
    """The reference path itself is differentiable end to end (gradcheck on a very small head)."""
    gen = torch.Generator().manual_seed(6)
    head = STSSAHead(4, axes=("spatial", "temporal"), num_layers=1, embed_dim=2, slow_kernel=3, dropout=0.0,
                     layernorm=True, use_fused=False).double()
    _randomise_gammas(head, gen)
    feats = torch.randn(1, 4, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 3.0, 5.0, 40.0, 50.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: head(f, rois), (feats,))


# -------------------------------------------------------------------------------- checkpoint loading
def _pytorchvideo_keys(cfg: I3DConfig, stage_blocks, head_block: int):
    """Key -> shape of a PyTorchVideo ``create_resnet`` state dict (the layout of i3d_r50 / slow_r50),
    written from PyTorchVideo's module names, not from our mapping."""
    shapes = {}
    w = cfg.width
    shapes["blocks.0.conv.weight"] = (w, 3, cfg.stem_temporal, 7, 7)
    for s in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"blocks.0.norm.{s}"] = (w,)
    dim_in = w
    for i, b in enumerate(stage_blocks):
        inner, out = w * 2 ** i, w * 2 ** i * 4
        pat = cfg.temporal_kernels[i]
        for j in range(cfg.depths[i]):
            p = f"blocks.{b}.res_blocks.{j}."
            cin = dim_in if j == 0 else out
            if j == 0:
                shapes[p + "branch1_conv.weight"] = (out, cin, 1, 1, 1)
                for s in ("weight", "bias", "running_mean", "running_var"):
                    shapes[p + f"branch1_norm.{s}"] = (out,)
            shapes[p + "branch2.conv_a.weight"] = (inner, cin, pat[j % len(pat)], 1, 1)
            shapes[p + "branch2.conv_b.weight"] = (inner, inner, 1, 3, 3)
            shapes[p + "branch2.conv_c.weight"] = (out, inner, 1, 1, 1)
            for n, c in (("a", inner), ("b", inner), ("c", out)):
                for s in ("weight", "bias", "running_mean", "running_var"):
                    shapes[p + f"branch2.norm_{n}.{s}"] = (c,)
        dim_in = out
    shapes[f"blocks.{head_block}.proj.weight"] = (400, dim_in)
    shapes[f"blocks.{head_block}.proj.bias"] = (400,)
    return shapes


def _pyslowfast_keys(cfg: I3DConfig):
    """Key -> shape of a PySlowFast ``ResNet`` (I3D, one pathway) ``model_state``, with a non-local block."""
    shapes = {}
    w = cfg.width
    shapes["s1.pathway0_stem.conv.weight"] = (w, 3, cfg.stem_temporal, 7, 7)
    for s in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"s1.pathway0_stem.bn.{s}"] = (w,)
    dim_in = w
    for i in range(4):
        inner, out = w * 2 ** i, w * 2 ** i * 4
        pat = cfg.temporal_kernels[i]
        for j in range(cfg.depths[i]):
            p = f"s{i + 2}.pathway0_res{j}."
            cin = dim_in if j == 0 else out
            if j == 0:
                shapes[p + "branch1.weight"] = (out, cin, 1, 1, 1)
                for s in ("weight", "bias", "running_mean", "running_var"):
                    shapes[p + f"branch1_bn.{s}"] = (out,)
            shapes[p + "branch2.a.weight"] = (inner, cin, pat[j % len(pat)], 1, 1)
            shapes[p + "branch2.b.weight"] = (inner, inner, 1, 3, 3)
            shapes[p + "branch2.c.weight"] = (out, inner, 1, 1, 1)
            for n, c in (("a", inner), ("b", inner), ("c", out)):
                for s in ("weight", "bias", "running_mean", "running_var"):
                    shapes[p + f"branch2.{n}_bn.{s}"] = (c,)
        dim_in = out
    shapes["s3.pathway0_nonlocal1.conv_theta.weight"] = (w, 2 * w * 4, 1, 1, 1)
    shapes["head.projection.weight"] = (400, dim_in)
    shapes["head.projection.bias"] = (400,)
    return shapes


def _random_sd(shapes, gen):
    # Every BatchNorm of both codebases also stores num_batches_tracked.
    shapes = {**shapes, **{k.replace("running_var", "num_batches_tracked"): () for k in shapes if k.endswith("running_var")}}
    return {k: (torch.randint(0, 100, (), generator=gen) if k.endswith("num_batches_tracked")
                else torch.randn(s, generator=gen)) for k, s in shapes.items()}


SMALL_R50 = {"depths": [2, 3, 2, 2], "width": 4}


def test_load_pytorchvideo_i3d_r50_layout(tmp_path):
    gen = torch.Generator().manual_seed(7)
    cfg = I3DConfig.from_dict(SMALL_R50)
    sd = _random_sd(_pytorchvideo_keys(cfg, stage_blocks=[1, 3, 4, 5], head_block=6), gen)
    path = tmp_path / "I3D_8x8_R50.pyth"
    torch.save({"model_state": sd, "cfg": "i3d"}, path)  # the model-zoo wrapping
    net = I3D(cfg)
    report = load_backbone(net, path)
    assert report.layout == "pytorchvideo"
    assert report.missing == []
    assert sorted(report.unexpected) == ["blocks.6.proj.bias", "blocks.6.proj.weight"]
    ours = net.state_dict()
    torch.testing.assert_close(ours["stem.conv.weight"], sd["blocks.0.conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(ours["res3.1.conv_a.weight"], sd["blocks.3.res_blocks.1.branch2.conv_a.weight"], rtol=0, atol=0)
    torch.testing.assert_close(ours["res5.0.shortcut.bn.running_var"],
                               sd["blocks.5.res_blocks.0.branch1_norm.running_var"], rtol=0, atol=0)
    torch.testing.assert_close(ours["res4.1.bn_c.weight"], sd["blocks.4.res_blocks.1.branch2.norm_c.weight"], rtol=0, atol=0)
    assert "missing" in str(report) and "unexpected (2)" in str(report)


def test_load_pytorchvideo_slow_r50_layout_and_shape_errors():
    gen = torch.Generator().manual_seed(8)
    slow = I3DConfig.from_dict({**SMALL_R50, "stem_temporal": 1, "temporal_kernels": "slow"})
    sd = _random_sd(_pytorchvideo_keys(slow, stage_blocks=[1, 2, 3, 4], head_block=5), gen)
    net = I3D(slow)
    report = load_backbone(net, sd)
    assert report.layout == "pytorchvideo" and sorted(report.unexpected) == ["blocks.5.proj.bias", "blocks.5.proj.weight"]
    torch.testing.assert_close(net.state_dict()["res4.0.conv_a.weight"],
                               sd["blocks.3.res_blocks.0.branch2.conv_a.weight"], rtol=0, atol=0)
    # A slow_r50 checkpoint into an I3D config: a clear error naming both keys, shapes, and the fix.
    before = copy.deepcopy(I3D(I3DConfig.from_dict(SMALL_R50)).state_dict())
    i3d = I3D(I3DConfig.from_dict(SMALL_R50))
    i3d.load_state_dict(before)
    with pytest.raises(CheckpointShapeError) as e:
        load_backbone(i3d, sd)
    msg = str(e.value)
    assert "blocks.0.conv.weight -> stem.conv.weight" in msg and "(4, 3, 1, 7, 7)" in msg and "(4, 3, 5, 7, 7)" in msg
    assert "temporal kernel" in msg
    # Nothing was copied before the error.
    for k, v in i3d.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_load_pyslowfast_pyth(tmp_path):
    gen = torch.Generator().manual_seed(9)
    cfg = I3DConfig.from_dict(SMALL_R50)
    sd = _random_sd(_pyslowfast_keys(cfg), gen)
    del sd["s4.pathway0_res1.branch2.b_bn.running_mean"]
    path = tmp_path / "I3D_NLN_8x8_R50.pyth"
    torch.save({"epoch": 196, "model_state": {f"module.{k}": v for k, v in sd.items()},
                "optimizer_state": {}}, path)
    net = I3D(cfg)
    report = load_backbone(net, path)
    assert report.layout == "pyslowfast"
    assert "res4.1.bn_b.running_mean" in report.missing
    assert set(report.unexpected) == {"s3.pathway0_nonlocal1.conv_theta.weight", "head.projection.weight",
                                      "head.projection.bias"}
    ours = net.state_dict()
    torch.testing.assert_close(ours["res2.1.conv_b.weight"], sd["s2.pathway0_res1.branch2.b.weight"], rtol=0, atol=0)
    torch.testing.assert_close(ours["res3.0.shortcut.conv.weight"], sd["s3.pathway0_res0.branch1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(ours["stem.bn.bias"], sd["s1.pathway0_stem.bn.bias"], rtol=0, atol=0)


def test_load_errors_and_own_layout_round_trip(tmp_path):
    net = I3D(I3DConfig.from_dict(SMALL_R50))
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        load_backbone(net, {"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="state dict"):
        load_backbone(net, {"model_state": {"a": 1}})
    other = I3D(I3DConfig.from_dict(SMALL_R50))
    report = load_backbone(other, net.state_dict())
    assert report.layout == "stssa" and not report.missing and not report.unexpected
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, net.state_dict()[k], rtol=0, atol=0)
    # A detector checkpoint of ours ("backbone." prefix; the head's keys are unexpected).
    det = build_model({"backbone": SMALL_R50, "head": {"type": "baseline"}}, load_pretrained=False)
    torch.save({"model": det.state_dict()}, tmp_path / "checkpoint.pt")
    report = load_backbone(I3D(I3DConfig.from_dict(SMALL_R50)), tmp_path / "checkpoint.pt")
    assert report.layout == "stssa-detector" and not report.missing
    assert sorted(report.unexpected) == ["head.classifier.bias", "head.classifier.weight"]


@pytest.mark.parametrize("T, kt", [(2, 3), (4, 5), (6, 7), (8, 3)])
@pytest.mark.parametrize("autocast", [True, False])
def test_conv3d_cpu_bf16_kernel_longer_than_the_clip(T, kt, autocast):
    """stssa.models.conv.Conv3d: nn.Conv3d's parameters and results, with finite and right bf16 weight
    gradients on CPU where oneDNN's are not (kt > T; torch 2.14.1)."""
    from stssa.models.conv import Conv3d
    torch.manual_seed(0)
    ref = nn.Conv3d(64, 8, (kt, 1, 1), padding=(kt // 2, 0, 0))
    conv = Conv3d(64, 8, (kt, 1, 1), padding=(kt // 2, 0, 0))
    conv.load_state_dict(ref.state_dict())
    assert list(conv.state_dict()) == list(ref.state_dict())
    x = torch.randn(5, 64, T, 7, 7)
    go = torch.randn(5, 8, T, 7, 7) * 1e-3
    m64 = copy.deepcopy(ref).double()
    x64 = x.double().requires_grad_()
    m64(x64).backward(go.double())
    if autocast:
        xb = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(xb)
    else:
        conv = conv.to(torch.bfloat16)
        xb = x.bfloat16().requires_grad_()
        y = conv(xb)
    assert y.dtype == torch.bfloat16
    y.backward(go.to(y.dtype))
    # the rule's baseline: PyTorch's plain bf16 conv3d with oneDNN off (right, 20-50x slower)
    mb = copy.deepcopy(ref).to(torch.bfloat16)
    xl = x.bfloat16().requires_grad_()
    with torch.backends.mkldnn.flags(enabled=False):
        mb(xl).backward(go.bfloat16())
    for name, g, lp, r in (("weight", conv.weight.grad, mb.weight.grad, m64.weight.grad),
                           ("x", xb.grad, xl.grad, x64.grad)):
        assert_by_rule(g, r, lp, name)
