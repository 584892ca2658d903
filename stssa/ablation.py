"""The paper's Table 4.2 ablation on the synthetic set, beside the baseline: ``python -m stssa.ablation``.

Protocol (the same for every row, so the rows differ only in their head):

1. Writes the synthetic AVA-format set (:mod:`stssa.data.synthetic`; classes that need motion, order,
   repetition count, duration, an in-box interaction, or only appearance) with a val split of several
   hundred person boxes.
2. Trains ONE backbone (``synthetic_ablation.yaml``: the tiny I3D, last BN of each block NOT zero-initialised,
   several hundred SGD steps) end to end with the neutral head of ``synthetic_stssa_0l.yaml`` (3-D
   RoIAlign, average over (T, r, r), linear), which is what every STSSA head is at ``gamma = 0`` and the
   baseline head is with average pooling. So no compared head shaped the features. How alive its residual
   branches are is measured (``||branch|| / ||shortcut||`` per block) and written to the results.
3. Caches, with the backbone frozen (eval mode), the time-resolved RoI features ``[C, T, r, r]``
   (``roi_align3d`` of the res5 map) of every ground-truth box of every train keyframe in
   ``train_views`` fixed augmented views (the training transform under a seed per view and keyframe), and
   of every proposal of every val keyframe (test transform). The baseline's 2-D RoIAlign of the temporal
   mean equals the temporal mean of the 3-D RoIAlign (bilinear sampling is linear and the same per frame),
   so both heads read the same cache: :meth:`forward_rois`.
4. Trains each row's head on the cache from its own seed (same recipe for all: SGD + Nesterov, cosine,
   warm-up, weight decay except on norms, biases and ``gamma``, same epochs and batch of RoIs) and scores
   the val proposals with the official frame-mAP. Chance: the same proposals with uniformly random scores.

Rows: ``baseline`` (PySlowFast head), the six Table 4.2 rows scaled (widths x C5/2048 = 1/32) and
controls (baseline with average pooling, STSSA with zero layers, full STSSA with max pooling, full STSSA
with SAGAN's unscaled logits), and, on request only, ``probe_flat``: a linear classifier on the unpooled
RoI features, a diagnostic of what the cache holds. Writes ``<out>/results.json`` (format in the issue / README),
``<out>/results.md`` and ``<out>/results.png``. ``--quick``: one row, one seed, a small set (smoke test).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stssa.utils import load_config

#: (name, config, paper frame-mAP on AVA v2.2 (Table 4.2) or None, what it is)
ROWS = [
    ("baseline", "synthetic_baseline", None, "PySlowFast head: temporal mean, RoIAlign, spatial max pool"),
    ("tsfa_gap512", "synthetic_tsfa_gap512", 18.5, "TSFA + GAP, 512-d"),
    ("tsfa_gmp512", "synthetic_tsfa_gmp512", 19.2, "TSFA + GMP, 512-d"),
    ("ssfa_gmp512", "synthetic_ssfa_gmp512", 20.8, "SSFA + GMP, 512-d"),
    ("ssfa_tsfa_gap2048", "synthetic_ssfa_tsfa_gap2048", 21.3, "SSFA + TSFA + GAP, 2048-d"),
    ("ssfa_tsfa_gap2048_2l", "synthetic_ssfa_tsfa_gap2048_2l", 21.7, "+ two layers"),
    ("ssfa_tsfa_gap2048_2l_ln", "synthetic_ssfa_tsfa_gap2048_2l_ln", 23.0, "+ LayerNorm (the paper's head)"),
    ("baseline_avg", "synthetic_baseline_avg", None, "control: baseline with average pooling"),
    ("stssa_0l", "synthetic_stssa_0l", None, "control: STSSA with zero layers (identity)"),
    ("stssa_max", "synthetic_stssa_max", None, "control: the paper's head with max pooling"),
    ("stssa_scale1", "synthetic_stssa_scale1", None, "variant: the paper's head, logits unscaled (SAGAN)"),
    ("probe_flat", "probe_flat", None, "diagnostic: linear classifier on the unpooled RoI features"),
]
ROW_NAMES = [r[0] for r in ROWS]
#: Rows run by default; ``probe_flat`` is a diagnostic, not a head of the comparison.
DEFAULT_ROWS = [n for n in ROW_NAMES if n != "probe_flat"]

PROTOCOLS: Dict[str, dict] = {
    "full": {
        "data": {"videos": 64, "seconds": 10, "seed": 0, "height": 96, "width": 128, "val_fraction": 0.35},
        "backbone_config": "synthetic_stssa_0l", "backbone_overrides": [],
        "train_views": 2, "threads": 1,
        "head": {"epochs": 10, "batch_size": 32, "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-4,
                 "warmup_frac": 0.05, "clip_grad": 10.0, "gamma_lr_mult": 1.0},
        "seeds": 3, "chance_draws": 10,
    },
    "quick": {
        "data": {"videos": 8, "seconds": 4, "seed": 0, "height": 96, "width": 128, "val_fraction": 0.35},
        "backbone_config": "synthetic_stssa_0l", "backbone_overrides": ["train.epochs=1", "train.warmup_steps=2"],
        "train_views": 1, "threads": 1,
        "head": {"epochs": 3, "batch_size": 32, "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-4,
                 "warmup_frac": 0.05, "clip_grad": 10.0, "gamma_lr_mult": 1.0},
        "seeds": 1, "chance_draws": 3,
    },
}
# `make demo` (stssa/demo.py): the full protocol's set, backbone and recipe, two rows, one seed.
PROTOCOLS["demo"] = {**copy.deepcopy(PROTOCOLS["full"]), "seeds": 1}
QUICK_ROWS = ["ssfa_tsfa_gap2048_2l_ln"]
DEMO_ROWS = ["baseline", "ssfa_tsfa_gap2048_2l_ln"]


# ------------------------------------------------------------------------------------------------- data
def ensure_dataset(root: Path, data_args: dict) -> None:
    """Write the synthetic set to ``root`` unless it is there with the same generator arguments."""
    from stssa.data.synthetic import make_dataset
    info = root / "synthetic_info.json"
    if info.exists():
        args = json.loads(info.read_text()).get("args", {})
        classes = json.loads(info.read_text()).get("classes", {})
        from stssa.data.synthetic import SYNTHETIC_ACTIONS
        if all(args.get(k) == v for k, v in data_args.items()) and set(map(int, classes)) == set(SYNTHETIC_ACTIONS):
            print(f"[ablation] reusing the synthetic dataset in {root}")
            return
    # regenerate only what is ours to replace: a new or empty folder, or a synthetic set (other arguments)
    ours = info.exists() and json.loads(info.read_text()).get("generator") == "stssa.data.synthetic"
    if root.exists() and any(root.iterdir()) and not ours:
        raise FileExistsError(f"{root} holds files that are not a synthetic set of stssa.data.synthetic (no "
                              f"{info.name} of it); pass a new or empty --data folder (nothing was deleted)")
    t0 = time.perf_counter()
    make_dataset(root, overwrite=True, **data_args)
    print(f"[ablation] wrote the synthetic dataset to {root} in {time.perf_counter() - t0:.1f}s")


def cues() -> Dict[int, str]:
    from stssa.data.synthetic import ACTION_CUES
    return dict(ACTION_CUES)


# ---------------------------------------------------------------------------------------------- backbone
@torch.no_grad()
def residual_ratios(backbone: nn.Module, clips: torch.Tensor) -> Dict[str, float]:
    """``||residual branch|| / ||shortcut||`` of every bottleneck on ``clips [B, 3, T, H, W]`` (eval mode):
    near 0 means the block passes its input through and its convolutions do nothing."""
    from stssa.models.i3d import Bottleneck
    out: Dict[str, float] = {}
    hooks = []

    def hook(name):
        def fn(mod, inp, _):
            y, ident = mod.branches(inp[0])
            out[name] = float(y.norm() / ident.norm().clamp_min(1e-12))
        return fn
    for name, m in backbone.named_modules():
        if isinstance(m, Bottleneck):
            hooks.append(m.register_forward_hook(hook(name)))
    was = backbone.training
    backbone.eval()
    try:
        backbone(clips)
    finally:
        backbone.train(was)
        for h in hooks:
            h.remove()
    return out


def train_backbone(data_root: Path, work: Path, config: str, overrides: Sequence[str] = (),
                   quiet: bool = False) -> tuple:
    """Train the shared backbone end to end with ``config``'s head (reused from ``work/backbone`` when a
    finished run with the same config is there). Returns ``(trainer-free model, info dict)``."""
    from stssa.models import build_model
    from stssa.train import Trainer
    cfg = load_config(config, [f"data.root={data_root}"] + list(overrides))
    run = work / "backbone"
    done = run / "backbone_done.pt"
    if done.exists():
        saved = torch.load(done, map_location="cpu", weights_only=False)
        if saved["config"] == cfg:
            model = build_model(cfg["model"], load_pretrained=False)
            model.load_state_dict(saved["model"])
            print(f"[ablation] reusing the trained backbone in {done}")
            return model, saved["info"]
    for p in run.glob("*") if run.exists() else ():
        if p.is_file():
            p.unlink()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run, device="cpu", quiet=quiet, overwrite=True)
    res = trainer.fit()
    info = {"config": config, "overrides": list(overrides), "steps": trainer.global_step,
            "epochs": trainer.tcfg["epochs"], "batch_size": trainer.tcfg["batch_size"],
            "train_s": round(time.perf_counter() - t0, 1), "end_to_end_mAP": res["mAP"],
            "final_loss": float(np.mean([h["loss"] for h in trainer.history[-20:]])),
            "last_bn_scale_mean_abs": {n: float(m.weight.detach().abs().mean()) for n, m in trainer.model.backbone.named_modules()
                                       if n.endswith("bn_c")}}
    model = trainer.model
    model.load_state_dict(model.state_dict())
    torch.save({"config": cfg, "model": model.state_dict(), "info": info}, done)
    return model, info


# --------------------------------------------------------------------------------------------- the cache
@dataclass
class FeatureCache:
    """Frozen-backbone RoI features: train ``x [N, C, T, r, r]``, ``y [N, 80]``, ``view [N]``, ``item [N]``;
    val ``val_x [M, C, T, r, r]`` and ``val_meta`` (M ``(video_id, ts, norm_box, score)``, the evaluator's
    rows); plus the RoIAlign settings they were made with."""
    x: torch.Tensor
    y: torch.Tensor
    view: torch.Tensor
    item: torch.Tensor
    val_x: torch.Tensor
    val_meta: list
    roi: dict = field(default_factory=dict)


def _roi_settings(head_cfg: dict) -> dict:
    return {"roi_size": int(head_cfg.get("roi_size", 7)), "sampling_ratio": int(head_cfg.get("sampling_ratio", 0)),
            "aligned": bool(head_cfg.get("aligned", True))}


@torch.no_grad()
def clip_roi_features(backbone: nn.Module, clips: torch.Tensor, rois: torch.Tensor, roi: dict) -> torch.Tensor:
    """``clips [B, 3, T, H, W], rois [K, 5] -> [K, C, T', r, r]``: what a head's ``roi_features`` gives."""
    from stssa.models.ops import get_op
    feats = backbone(clips)
    r = roi["roi_size"]
    return get_op("roi_align3d", True)(feats, rois, (r, r), 1.0 / backbone.cfg.stride, roi["sampling_ratio"],
                                       roi["aligned"])


def build_cache(backbone: nn.Module, data_cfg: dict, roi: dict, views: int, seed: int = 0,
                batch_size: int = 8, quiet: bool = False) -> FeatureCache:
    """Run the frozen backbone over ``views`` augmented views of every train keyframe and over the val
    keyframes (their proposals), keeping the RoI features (see the module docstring)."""
    from tqdm import tqdm
    from torch.utils.data import DataLoader
    from stssa.data import ava_collate
    from stssa.train import SeededItems, build_datasets
    train_set, val_set, _ = build_datasets(data_cfg)
    backbone.eval()
    xs, ys, vs, its = [], [], [], []
    items = SeededItems(train_set, seed)
    bar = tqdm(total=views * len(train_set) + len(val_set), desc="cache features", unit="clip",
               disable=quiet, dynamic_ncols=True)
    for v in range(views):
        items.epoch = 1000 + v  # the views' augmentations: a function of (seed, view, keyframe)
        idx = list(range(len(train_set)))
        batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        for b, batch in zip(batches, DataLoader(items, batch_sampler=batches, collate_fn=ava_collate, num_workers=1)):
            x = clip_roi_features(backbone, batch["clips"], batch["rois"], roi)
            xs.append(x)
            ys.append(batch["labels"])
            vs.append(torch.full((len(x),), v, dtype=torch.int64))
            its.append(torch.tensor(b, dtype=torch.int64).repeat_interleave(batch["boxes_per_clip"]))
            bar.update(len(b))
    idx = list(range(len(val_set)))
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    val_x, meta = [], []
    for b, batch in zip(batches, DataLoader(val_set, batch_sampler=batches, collate_fn=ava_collate, num_workers=1)):
        val_x.append(clip_roi_features(backbone, batch["clips"], batch["rois"], roi))
        meta.extend(batch["meta"])
        bar.update(len(b))
    bar.close()
    return FeatureCache(torch.cat(xs), torch.cat(ys), torch.cat(vs), torch.cat(its), torch.cat(val_x), meta, dict(roi))


# ----------------------------------------------------------------------------------------------- heads
class FlatProbe(nn.Module):
    """Diagnostic "head": dropout + Linear over the whole unpooled RoI feature ``[C, T, r, r]``, so every
    (time, position) gets its own weights. It shows what the cached features hold linearly, order
    included (a linear map can weigh early and late frames differently), which no pooled head can beat
    by more than its non-linearity adds. ``forward_rois(x [K, C, T, r, r]) -> [K, classes]``."""

    def __init__(self, in_features: int, num_classes: int = 80, dropout: float = 0.3, roi_size: int = 3,
                 sampling_ratio: int = 0, aligned: bool = True):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_features, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward_rois(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(x.flatten(1)))


#: The probe's RoI settings and input size (C5 x T5 x r x r of the synthetic_ablation backbone).
PROBE_CONFIG = {"roi_size": 3, "sampling_ratio": 0, "aligned": True, "dropout": 0.3}


def head_config(config: str) -> dict:
    if config == "probe_flat":
        return dict(PROBE_CONFIG)
    return dict(load_config(config)["model"]["head"])


def build_row_head(config: str, in_channels: int, stride: int, seed: int,
                   overrides: Optional[dict] = None) -> nn.Module:
    """The row's head (initialised from ``seed``); ``overrides`` apply to STSSA heads only."""
    from stssa.models.detector import build_head
    hc = head_config(config)
    if config == "probe_flat":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return FlatProbe(in_channels, 80, hc["dropout"], hc["roi_size"])  # in_channels: C * T * r * r
    if overrides and hc.get("type", "stssa") == "stssa":
        hc.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_head(hc, in_channels, 1.0 / stride, 80, use_fused=True)


def _param_groups(head: nn.Module, hcfg: dict) -> List[dict]:
    groups = {"decay": [], "no_decay": [], "gamma": []}
    for name, p in head.named_parameters():
        key = "gamma" if ".gamma." in f".{name}." or name.split(".")[-2:-1] == ["gamma"] else \
            ("decay" if p.dim() > 1 else "no_decay")
        groups[key].append(p)
    return [{"params": groups["decay"], "weight_decay": hcfg["weight_decay"], "lr_mult": 1.0},
            {"params": groups["no_decay"], "weight_decay": 0.0, "lr_mult": 1.0},
            {"params": groups["gamma"], "weight_decay": 0.0, "lr_mult": hcfg["gamma_lr_mult"]}]


def train_head(head: nn.Module, cache: FeatureCache, hcfg: dict, seed: int, desc: str = "head",
               quiet: bool = False) -> dict:
    """Train ``head`` on the cached train RoIs (every view, shuffled per epoch from ``seed``); returns the
    loss history and the head's diagnostics. Deterministic for a seed on CPU."""
    from tqdm import tqdm
    g = torch.Generator().manual_seed(seed)
    n, bs = len(cache.x), hcfg["batch_size"]
    spe = max(n // bs, 1)
    total = spe * hcfg["epochs"]
    warm = max(int(round(hcfg["warmup_frac"] * total)), 1)
    opt = torch.optim.SGD(_param_groups(head, hcfg), lr=hcfg["lr"], momentum=hcfg["momentum"], nesterov=True)
    losses = []
    head.train()
    bar = tqdm(total=total, desc=desc, unit="step", disable=quiet, dynamic_ncols=True, leave=False)
    step = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # dropout masks
        for _ in range(hcfg["epochs"]):
            perm = torch.randperm(n, generator=g)
            for s in range(spe):
                idx = perm[s * bs:(s + 1) * bs]
                t = step / max(total - 1, 1)
                lr = hcfg["lr"] * 0.5 * (1 + math.cos(math.pi * t)) * min(1.0, (step + 1) / warm)
                for grp in opt.param_groups:
                    grp["lr"] = lr * grp["lr_mult"]
                loss = F.binary_cross_entropy_with_logits(head.forward_rois(cache.x[idx]), cache.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if hcfg["clip_grad"] > 0:
                    nn.utils.clip_grad_norm_(head.parameters(), hcfg["clip_grad"])
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update(1)
    bar.close()
    return {"steps": step, "final_loss": float(np.mean(losses[-max(spe, 1):])), "diagnostics": head_diagnostics(head)}


def head_diagnostics(head: nn.Module) -> dict:
    """The learned ``gamma`` of every attention branch (``blocks.i.gamma.slow/fast``)."""
    return {name: round(float(p.detach()), 5) for name, p in head.named_parameters() if ".gamma." in name}


@torch.no_grad()
def attention_stats(head: nn.Module, x: torch.Tensor) -> dict:
    """Per block and branch of an STSSA head on RoI features ``x [K, C, T, r, r]``: the mean entropy of
    the attention rows over ``log(sequence length)`` (1 = uniform, 0 = one-hot), ``gamma``, and
    ``||gamma * attention output|| / ||block input||`` (how much the branch changes its input)."""
    out = {}
    for i, blk in enumerate(getattr(head, "blocks", [])):
        x, stats = block_reference(blk, x)
        out.update({f"blocks.{i}.{blk.axis}.{b}": v for b, v in stats.items()})
    return out


@torch.no_grad()
def block_reference(blk: nn.Module, x: torch.Tensor) -> tuple:
    """One :class:`~stssa.models.heads.SlowFastAttention` block recomputed in float64 from its parameters
    (the math of ``attention3d_ref``, with the block's scale and norm placement), keeping each branch's
    attention (one attention head). Returns ``(output [K, C, T, r, r] in x's dtype, {branch: stats})``."""
    if blk.heads != 1:
        raise ValueError(f"block_reference: blocks with heads=1 only, got heads={blk.heads}")
    src = blk.norm(x) if blk.norm is not None and blk.norm_position == "pre" else x
    convs = blk._convs()
    qkv = [F.conv3d(src.double(), c.weight.double(), c.bias.double(), padding=c.padding) for c in convs]

    def seq(t):  # [K, C, T, H, W] -> sequences [N, L, C] along the block's axis
        return t.permute(0, 2, 3, 4, 1).flatten(2, 3).flatten(0, 1) if blk.axis == "spatial" else \
            t.permute(0, 3, 4, 2, 1).flatten(0, 2)
    y = x.double()
    stats = {}
    for j, b in enumerate(blk.branches):
        qs, ks, vs = (seq(t) for t in qkv[3 * j: 3 * j + 3])
        scale = blk.scale if blk.scale is not None else qs.shape[-1] ** -0.5
        p = torch.softmax(scale * qs @ ks.transpose(-1, -2), -1)
        ent = float((-(p * p.clamp_min(1e-300).log()).sum(-1) / math.log(p.shape[-1])).mean()) \
            if p.shape[-1] > 1 else 1.0
        upd = blk.gamma[b].double() * _unseq(p @ vs, x.shape, blk.axis)
        stats[b] = {"entropy_over_max": round(ent, 4), "gamma": round(float(blk.gamma[b]), 4),
                    "update_over_input": round(float(upd.norm() / x.double().norm().clamp_min(1e-300)), 4)}
        y = y + upd
    y = y.to(x.dtype)
    return (blk.norm(y) if blk.norm is not None and blk.norm_position == "post" else y), stats


def _unseq(att: torch.Tensor, shape, axis: str) -> torch.Tensor:
    k, c, t, h, w = shape
    if axis == "spatial":
        return att.reshape(k, t, h, w, c).permute(0, 4, 1, 2, 3)
    return att.reshape(k, h, w, t, c).permute(0, 4, 3, 1, 2)


def diagnose(out: Path, work: Path, rows: Sequence[str]) -> dict:
    """``attention_stats`` of every saved head (``out/heads/<row>_seed<k>.pt``) on the cached val RoIs;
    written to ``out/diagnostics.json``."""
    saved = torch.load(work / "feature_cache.pt", weights_only=False)
    cache = saved["cache"]
    configs = {r[0]: r[1] for r in ROWS}
    overrides = json.loads((out / "results.json").read_text()).get("head_overrides") or None
    res = {}
    for name in rows:
        for f in sorted((out / "heads").glob(f"{name}_seed*.pt")):
            head = build_row_head(configs[name], cache.x.shape[1], 16, 0, overrides)
            head.load_state_dict(torch.load(f, weights_only=True))
            res[f.stem] = attention_stats(head.eval(), cache.val_x[:256])
    (out / "diagnostics.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


@torch.no_grad()
def score_head(head: nn.Module, cache: FeatureCache, eval_info: dict, chunk: int = 256) -> dict:
    """frame-mAP (official protocol) of ``head`` on the cached val proposals."""
    from stssa.data import read_labelmap
    from stssa.evaluate import evaluate_frame_map, rows_from_predictions
    head.eval()
    scores = torch.cat([torch.sigmoid(head.forward_rois(cache.val_x[i:i + chunk]))
                        for i in range(0, len(cache.val_x), chunk)])
    _, eval_ids = read_labelmap(eval_info["labelmap"])
    rows = rows_from_predictions(cache.val_meta, scores, class_ids=eval_ids)
    return evaluate_frame_map(eval_info["labelmap"], eval_info["groundtruth"], rows, eval_info["excluded"])


@torch.no_grad()
def write_head_detections(out: Path, work: Path, row: str, seed: int, path: Path) -> int:
    """The val detections (official CSV) of the head saved by a run (``out/heads/<row>_seed<seed>.pt``) on
    the cached val proposals of ``work``; returns the number of rows written."""
    from stssa.data import read_labelmap
    from stssa.evaluate import rows_from_predictions, write_detections_csv
    cache = torch.load(Path(work) / "feature_cache.pt", weights_only=False)["cache"]
    doc = json.loads((Path(out) / "results.json").read_text())
    config = {r[0]: r[1] for r in ROWS}[row]
    in_ch = int(cache.x[0].numel()) if config == "probe_flat" else int(cache.x.shape[1])
    head = build_row_head(config, in_ch, 16, seed, doc.get("head_overrides") or None)
    head.load_state_dict(torch.load(Path(out) / "heads" / f"{row}_seed{seed}.pt", weights_only=True))
    head.eval()
    scores = torch.cat([torch.sigmoid(head.forward_rois(cache.val_x[i:i + 256]))
                        for i in range(0, len(cache.val_x), 256)])
    labelmap = Path(doc["labelmap"]) if "labelmap" in doc else None
    _, eval_ids = read_labelmap(labelmap) if labelmap else (None, None)
    rows = rows_from_predictions(cache.val_meta, scores, class_ids=eval_ids)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_detections_csv(path, rows)


def chance_map(cache: FeatureCache, eval_info: dict, draws: int) -> float:
    """frame-mAP of the val proposals with uniformly random scores (mean over ``draws``)."""
    from stssa.data import read_labelmap
    from stssa.evaluate import evaluate_frame_map, rows_from_predictions
    _, eval_ids = read_labelmap(eval_info["labelmap"])
    maps = []
    for s in range(draws):
        rnd = torch.rand(len(cache.val_meta), 80, generator=torch.Generator().manual_seed(s))
        rows = rows_from_predictions(cache.val_meta, rnd, class_ids=eval_ids)
        maps.append(evaluate_frame_map(eval_info["labelmap"], eval_info["groundtruth"], rows,
                                       eval_info["excluded"])["mAP"])
    return float(np.mean(maps))


def run_row(name: str, config: str, cache: FeatureCache, eval_info: dict, hcfg: dict, seeds: Sequence[int],
            in_channels: int, stride: int, quiet: bool = False, head_overrides: Optional[dict] = None,
            save_dir: Optional[Path] = None) -> dict:
    """Train and score one row over ``seeds``; the per-row entry of ``results.json`` (plus extras).
    ``head_overrides`` change keys of the row's head config (STSSA rows only; e.g. ``scale``, ``gamma_init``);
    ``save_dir`` keeps each trained head's ``state_dict`` as ``<name>_seed<k>.pt``."""
    if _roi_settings(head_config(config)) != cache.roi:
        raise ValueError(f"{config}: RoI settings {_roi_settings(head_config(config))} differ from the cache's "
                         f"{cache.roi}; every row must use the same RoIAlign")
    maps, per_class, runs = [], {}, []
    for seed in seeds:
        in_ch = int(cache.x[0].numel()) if config == "probe_flat" else in_channels
        head = build_row_head(config, in_ch, stride, seed, head_overrides)
        t0 = time.perf_counter()
        tr = train_head(head, cache, hcfg, seed, desc=f"{name} seed {seed}", quiet=quiet)
        res = score_head(head, cache, eval_info)
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            torch.save(head.state_dict(), save_dir / f"{name}_seed{seed}.pt")
        maps.append(float(res["mAP"]))
        for c, r in res["per_class"].items():
            per_class.setdefault(int(c), []).append(float(r["ap"]))
        runs.append({"seed": seed, "mAP": res["mAP"], "train_s": round(time.perf_counter() - t0, 1), **tr})
        if not quiet:
            print(f"[ablation] {name} seed {seed}: frame-mAP {res['mAP']:.4f} "
                  f"({runs[-1]['train_s']:.0f}s, final loss {tr['final_loss']:.4f})", flush=True)
    return {"name": name, "config": config, "mAP": maps, "mean": float(np.mean(maps)),
            "std": float(np.std(maps, ddof=1)) if len(maps) > 1 else 0.0,
            "per_class": {str(c): float(np.mean(v)) for c, v in sorted(per_class.items())},
            "head_params": sum(p.numel() for p in head.parameters()), "runs": runs}


# --------------------------------------------------------------------------------------------- outputs
def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_string() -> str:
    return f"CPU: {_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent, check=True)
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
        return c + ("+dirty" if r.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(doc: dict) -> str:
    rows = doc["rows"]
    base = next((r for r in rows if r["name"] == "baseline"), None)
    desc = {r[0]: r[3] for r in ROWS}
    lines = ["| row | what | paper frame-mAP (AVA) | frame-mAP (synthetic), mean +- std | per seed | vs baseline |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        paper = "-" if r["paper_mAP"] is None else f"{r['paper_mAP']:.1f}"
        delta = "" if base is None or r is base else f"{r['mean'] - base['mean']:+.3f}"
        lines.append(f"| {r['name']} | {r.get('what') or desc.get(r['name'], '')} | {paper} | {r['mean']:.3f} +- {r['std']:.3f} | "
                     f"{', '.join(f'{m:.3f}' for m in r['mAP'])} | {delta} |")
    lines.append(f"| chance | same proposals, random scores | - | {doc['chance']:.3f} | | |")
    return "\n".join(lines) + "\n"


def per_class_table(doc: dict, a: str, b: str) -> str:
    ra = next(r for r in doc["rows"] if r["name"] == a)
    rb = next(r for r in doc["rows"] if r["name"] == b)
    names = doc.get("class_names", {})
    cue = doc.get("cues", {})
    lines = [f"| class | cue | {a} | {b} | difference |", "|---|---|---|---|---|"]
    for c in sorted(ra["per_class"], key=int):
        pa, pb = ra["per_class"][c], rb["per_class"].get(c, float("nan"))
        lines.append(f"| {c} {names.get(c, '')} | {cue.get(c, '')} | {pa:.3f} | {pb:.3f} | {pb - pa:+.3f} |")
    return "\n".join(lines) + "\n"


def cue_table(doc: dict) -> str:
    """Mean AP per cue group (the classes' ``cues``) for every row: where a head gains or loses."""
    groups: Dict[str, List[str]] = {}
    for c, cue in doc.get("cues", {}).items():
        groups.setdefault(cue, []).append(c)
    names = sorted(groups)
    lines = ["| row | " + " | ".join(f"{g} ({len(groups[g])})" for g in names) + " |",
             "|---|" + "---|" * len(names)]
    for r in doc["rows"]:
        vals = []
        for g in names:
            aps = [r["per_class"][c] for c in groups[g] if c in r["per_class"]]
            vals.append(f"{np.mean(aps):.3f}" if aps else "-")
        lines.append(f"| {r['name']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def best_stssa_row(doc: dict) -> Optional[str]:
    cands = [r for r in doc["rows"] if r["name"] not in ("baseline", "baseline_avg", "probe_flat")
             and not r["name"].startswith("stssa_0l")]
    return max(cands, key=lambda r: r["mean"])["name"] if cands else None


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = doc["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
    ax = axes[0]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["mean"] for r in rows], 0.4, yerr=[r["std"] for r in rows], capsize=3, color="tab:blue",
           label=f"synthetic frame-mAP (mean +- std, {len(rows[0]['mAP'])} seeds)")
    ax.axhline(doc["chance"], color="grey", ls=":", label=f"chance {doc['chance']:.3f}")
    ax.set_xticks(x)
    ax.set_xticklabels([r["name"] for r in rows], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("frame-mAP, synthetic val")
    ax2 = ax.twinx()
    pm = [r["paper_mAP"] if r["paper_mAP"] is not None else np.nan for r in rows]
    ax2.bar(x + 0.2, pm, 0.4, color="tab:orange", alpha=0.7, label="paper, AVA v2.2 (Table 4.2)")
    ax2.set_ylabel("frame-mAP % (paper, AVA)")
    ax2.set_ylim(0, 30)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    ax.set_title("Table 4.2 rows and controls vs the baseline")
    best = best_stssa_row(doc)
    ax = axes[1]
    base = next((r for r in rows if r["name"] == "baseline"), rows[0])
    other = next((r for r in rows if r["name"] == best), base)
    cls = sorted(base["per_class"], key=int)
    names, cue = doc.get("class_names", {}), doc.get("cues", {})
    y = np.arange(len(cls))
    ax.barh(y + 0.2, [base["per_class"][c] for c in cls], 0.4, label=base["name"], color="tab:grey")
    ax.barh(y - 0.2, [other["per_class"].get(c, np.nan) for c in cls], 0.4, label=other["name"], color="tab:green")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{'* ' if cue.get(c, 'appearance') != 'appearance' else ''}{c} {names.get(c, '')[:18]} "
                        f"[{cue.get(c, '')[:12]}]" for c in cls], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("AP (mean over seeds); * = needs time")
    ax.legend(fontsize=8)
    ax.set_title(f"per class: best STSSA-type row ({other['name']}) vs baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown_table(doc)
    best = best_stssa_row(doc)
    md += "\nMean AP per cue group (number of classes):\n\n" + cue_table(doc)
    if best and any(r["name"] == "baseline" for r in doc["rows"]):
        md += "\nPer class, baseline vs the best STSSA-type row:\n\n" + per_class_table(doc, "baseline", best)
    (out / "results.md").write_text(md)
    plot(doc, out / "results.png")


# ---------------------------------------------------------------------------------------------- driver
def run_ablation(rows: Sequence[str], seeds: int, out: Path, data_root: Path, protocol: dict,
                 protocol_name: str, quiet: bool = False, work: Optional[Path] = None,
                 head_overrides: Optional[dict] = None) -> dict:
    """Everything of the module docstring; writes the outputs after every row (a partial run leaves a
    valid ``results.json`` with the rows done so far). The backbone run and the feature cache live in
    ``work`` (default ``out``) and are reused by a later call with the same settings. Returns the results
    document."""
    unknown = sorted(set(rows) - set(ROW_NAMES))
    if unknown:
        raise ValueError(f"--rows: unknown rows {unknown}; known: {ROW_NAMES}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if head_overrides:  # a bad key fails here, not after the dataset, the backbone and the feature cache
        configs = {r[0]: r[1] for r in ROWS}
        for name in rows:
            with torch.device("meta"):
                try:
                    build_row_head(configs[name], 64, 16, 0, head_overrides)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"--head-set {head_overrides}: row {name!r}: {e}") from None
    torch.set_num_threads(protocol["threads"])
    t_start = time.perf_counter()
    ensure_dataset(data_root, protocol["data"])
    from stssa.train import build_datasets
    work = Path(work or out)
    model, binfo = train_backbone(data_root, work, protocol["backbone_config"], protocol["backbone_overrides"], quiet)
    torch.set_num_threads(protocol["threads"])  # the trainer may have changed it (train.threads)
    backbone = model.backbone.eval()
    cfg = load_config(protocol["backbone_config"], [f"data.root={data_root}"])
    roi = _roi_settings(cfg["model"]["head"])
    train_set, val_set, eval_info = build_datasets(cfg["data"])
    from stssa.data import ava_collate
    probe = ava_collate([val_set[i] for i in range(min(4, len(val_set)))])
    binfo["residual_over_shortcut"] = residual_ratios(backbone, probe["clips"])
    t0 = time.perf_counter()
    key = {"backbone": binfo["train_s"], "steps": binfo["steps"], "views": protocol["train_views"], "roi": roi,
           "data": protocol["data"]}
    cache_file = work / "feature_cache.pt"
    saved = torch.load(cache_file, weights_only=False) if cache_file.exists() else None
    if saved is not None and saved["key"] == key:
        cache = saved["cache"]
        print(f"[ablation] reusing the feature cache {cache_file}")
    else:
        cache = build_cache(backbone, cfg["data"], roi, protocol["train_views"], seed=0, quiet=quiet)
        torch.save({"key": key, "cache": cache}, cache_file)
    cache_s = time.perf_counter() - t0
    from stssa.data.synthetic import SYNTHETIC_ACTIONS
    doc = {
        "protocol": (f"{protocol_name}: one backbone ({protocol['backbone_config']}, {binfo['steps']} steps, "
                     f"last BN not zero-initialised) trained end to end with the neutral head; its frozen "
                     f"res5 RoI features cached ({protocol['train_views']} augmented views per train keyframe, "
                     f"test view of the val proposals); every head trained on the cache with the same recipe "
                     f"from {seeds} seeds; official frame-mAP@0.5 on the val proposals; see stssa/ablation.py"),
        "device": device_string(), "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shared_machine": "run on a 2-core CPU shared with other jobs (timings are not benchmarks)",
        "chance": chance_map(cache, eval_info, protocol["chance_draws"]),
        "dataset": {**protocol["data"], "train_keyframes": len(train_set), "val_keyframes": len(val_set),
                    "train_rois": int(len(cache.x) // max(protocol["train_views"], 1)), "val_proposals": len(cache.val_x),
                    "val_gt_boxes_per_class": _val_counts(eval_info)},
        "backbone": binfo, "cache": {"train_views": protocol["train_views"], "roi": roi,
                                     "feature_shape": list(cache.x.shape[1:]), "build_s": round(cache_s, 1)},
        "head_recipe": protocol["head"], "head_overrides": dict(head_overrides or {}),
        "cues": {str(k): v for k, v in cues().items()},
        "labelmap": str(eval_info["labelmap"]),
        "class_names": {str(k): v for k, v in SYNTHETIC_ACTIONS.items()},
        "rows": [],
    }
    paper = {r[0]: r[2] for r in ROWS}
    configs = {r[0]: r[1] for r in ROWS}
    for name in rows:
        r = run_row(name, configs[name], cache, eval_info, protocol["head"], list(range(seeds)),
                    backbone.out_channels, backbone.cfg.stride, quiet, head_overrides, out / "heads")
        r["paper_mAP"] = paper[name]
        doc["rows"].append(r)
        doc["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_outputs(doc, out)
    return doc


def _val_counts(eval_info: dict) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for line in Path(eval_info["groundtruth"]).read_text().splitlines():
        if line:
            a = line.split(",")[6]
            counts[a] = counts.get(a, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stssa.ablation", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="rows: " + ", ".join(ROW_NAMES) + " (probe_flat: not run by default)")
    ap.add_argument("--rows", nargs="*", default=None, choices=ROW_NAMES,
                    help="rows to run (default: all; baseline first)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3; --quick 1)")
    ap.add_argument("--out", default="runs/ablation", help="results.json / .md / .png and the backbone run")
    ap.add_argument("--data", default=None, help="dataset folder (default data/synthetic_ablation[_quick])")
    ap.add_argument("--quick", action="store_true", help="one row, one seed, a small set (< 5 min)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--work", default=None, help="folder of the backbone run and feature cache (default --out; "
                                                 "point it at an earlier run to reuse them)")
    ap.add_argument("--head-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override keys of every STSSA row's head config, e.g. scale=1.0 gamma_init=0.1")
    ap.add_argument("--diagnose", action="store_true",
                    help="no training: attention entropy, gamma and update sizes of the heads saved in --out "
                         "(on the cached val RoIs of --work), written to <out>/diagnostics.json")
    ap.add_argument("--backbone-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of the shared backbone's training config, e.g. train.epochs=40")
    ap.add_argument("--recipe-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override the head training recipe, e.g. gamma_lr_mult=10 epochs=20")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else "full"
    protocol = copy.deepcopy(PROTOCOLS[name])
    import yaml
    for item in args.recipe_set:
        k, _, v = item.partition("=")
        if k not in protocol["head"]:
            raise SystemExit(f"--recipe-set: unknown key {k!r}; known: {sorted(protocol['head'])}")
        protocol["head"][k] = yaml.safe_load(v)
    protocol["backbone_overrides"] = list(protocol["backbone_overrides"]) + list(args.backbone_set)
    head_overrides = {}
    for item in args.head_set:
        k, eq, v = item.partition("=")
        if not eq or not k:
            ap.error(f"--head-set: expected KEY=VALUE, got {item!r}")
        head_overrides[k] = yaml.safe_load(v)
    if args.seeds is not None and args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    rows = args.rows if args.rows else (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    seeds = args.seeds if args.seeds is not None else protocol["seeds"]
    data = Path(args.data or ("data/synthetic_ablation_quick" if args.quick else "data/synthetic_ablation"))
    if args.diagnose:
        res = diagnose(Path(args.out), Path(args.work or args.out), rows)
        print(json.dumps(res, indent=1))
        return 0
    try:
        doc = run_ablation(rows, seeds, Path(args.out), data, protocol, name, quiet=args.quiet,
                           work=Path(args.work) if args.work else None, head_overrides=head_overrides)
    except (ValueError, FileExistsError) as e:  # argument and data-folder errors, before any training
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(markdown_table(doc))
    print(f"[ablation] wrote {Path(args.out) / 'results.json'}, results.md, results.png ({doc.get('wall_s', 0):.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
