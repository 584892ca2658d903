"""Train and evaluate an action detector: ``python -m stssa.train --config CONFIG.yaml [--resume]``.

One CPU, one GPU or many: ``torchrun --nproc_per_node=N -m stssa.train --config ...`` runs
DistributedDataParallel (NCCL on GPUs, gloo on CPU), each process reading its shard of every epoch;
rank 0 alone logs and writes checkpoints.

What a run does (config sections ``model``, ``data``, ``train``; see ``stssa/configs/*.yaml``):

* loss: sigmoid binary cross-entropy over the classes, averaged over RoIs and classes;
* SGD with momentum (Nesterov optional), weight decay on conv/linear weights only (not on norms,
  biases or the attention ``gamma``), linear warm-up then a step or cosine schedule; the learning
  rate is a pure function of the global step, so resuming needs no scheduler state;
* AMP (``train.amp``: ``none``, ``fp16`` with a GradScaler, ``bf16``), gradient clipping by norm;
* tqdm progress (loss, clips/s, ETA) on rank 0, ``metrics.csv`` (one row per step) and TensorBoard
  scalars under ``<out>/tb``;
* checkpoints written atomically (temp file + ``os.replace``) every ``train.ckpt_every`` steps and at
  the end of every epoch to ``<out>/checkpoint.pt`` (and ``<out>/checkpoint_epoch<E>.pt``);
* at the end of each epoch (``train.eval_every`` epochs): detections on the val set in the official CSV
  form (``<out>/detections_epoch<E>.csv``) and the frame-mAP (``stssa.evaluate``), logged to ``eval.csv``.

Exact resume. ``--resume`` restores model, optimizer, GradScaler, the position inside the epoch and
every process's RNG state from the last checkpoint. The order of an epoch's clips is a pure function of
``(seed, epoch)`` and each clip's augmentation of ``(seed, epoch, index)`` (not of which worker loads it),
so the steps after the checkpoint see the same batches and dropout masks as an uninterrupted run and,
with deterministic kernels (CPU; ``torch.use_deterministic_algorithms`` on GPU), the same losses bit for
bit. ``metrics.csv`` rows after the checkpoint step (written before a kill) are dropped on resume.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from stssa.models import build_model
from stssa.utils import atomic_save, load_checkpoint, load_config, rng_state, seed_everything, set_rng_state

TRAIN_DEFAULTS = {
    "epochs": 6, "batch_size": 2, "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-7,
    "warmup_steps": 0, "warmup_epochs": None, "warmup_start_factor": 0.1, "schedule": "cosine", "step_milestones": [],
    "step_gamma": 0.1, "cosine_final_factor": 0.0, "amp": "none", "clip_grad": 0.0, "ckpt_every": 200,
    "eval_every": 1, "seed": 0, "num_workers": 2, "log_every": 1, "deterministic": False,
    "head_lr_mult": 1.0, "threads": None,
}


# ------------------------------------------------------------------------------------------------ data
class SeededItems(Dataset):
    """Makes item ``i``'s random augmentation a function of ``(seed, epoch, i)`` alone.

    The AVA transforms draw from the global torch RNG; in a worker that RNG depends on the worker's
    seed and on which items it loaded before, so an interrupted and resumed epoch would augment
    differently. Here each item runs under a forked RNG seeded from ``(seed, epoch, i)``.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
            return self.dataset[i]


class EpochBatches:
    """Batches of dataset indices for one epoch on one rank, starting at batch ``start``.

    Training (``shuffle``): a permutation drawn from ``(seed, epoch)``, cut into ``world * batch_size``
    chunks (the incomplete last chunk is dropped so every rank takes the same number of steps); rank
    ``r`` takes the ``r``-th ``batch_size`` slice of each chunk. Evaluation: ``rank::world`` in order,
    nothing dropped.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world: int = 1, start: int = 0):
        self.n, self.bs, self.shuffle = n, batch_size, shuffle
        self.seed, self.epoch, self.rank, self.world, self.start = seed, epoch, rank, world, start

    def batches(self) -> List[List[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            chunk = self.bs * self.world
            out = [perm[c + self.rank * self.bs: c + (self.rank + 1) * self.bs]
                   for c in range(0, self.n - chunk + 1, chunk)]
        else:
            mine = list(range(self.rank, self.n, self.world))
            out = [mine[i: i + self.bs] for i in range(0, len(mine), self.bs)]
        return out[self.start:]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self):
        return len(self.batches())


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    return n // (batch_size * world)


def _path(root: Optional[str], p):
    if p is None:
        return None
    p = Path(p)
    return p if p.is_absolute() or root is None else Path(root) / p


def build_datasets(dcfg: dict):
    """``data`` section -> (train AVADataset, val AVADataset, eval dict with labelmap / gt / exclusions).

    Paths are relative to ``data.root``. Keys: ``frames``, ``labelmap`` (the training classes),
    ``train_csv``, ``val_csv``, ``eval_labelmap`` (classes scored, default ``labelmap``),
    ``val_proposals``, ``proposal_threshold``, ``exclusions``, ``num_frames``, ``sampling_rate``,
    ``crop_size``, ``jitter_scales``, ``flip_prob``, ``test_short_side``, ``num_classes``.
    """
    from stssa.data import AVADataset
    d = dict(dcfg)
    root = d.pop("root", None)
    frames = _path(root, d.pop("frames", "frames"))
    missing = [k for k in ("labelmap", "train_csv", "val_csv") if k not in d]
    if missing:
        raise ValueError(f"data: missing key(s) {missing} (paths relative to data.root)")
    labelmap = _path(root, d.pop("labelmap"))
    train_csv = _path(root, d.pop("train_csv"))
    val_csv = _path(root, d.pop("val_csv"))
    eval_labelmap = _path(root, d.pop("eval_labelmap", None)) or labelmap
    proposals = _path(root, d.pop("val_proposals", None))
    exclusions = _path(root, d.pop("exclusions", None))
    proposal_threshold = d.pop("proposal_threshold", 0.8)
    common = {k: d.pop(k) for k in ("num_frames", "sampling_rate", "crop_size", "num_classes", "frame_pattern",
                                     "frame_start", "fps", "video_start_sec") if k in d}
    train_only = {k: d.pop(k) for k in ("jitter_scales", "flip_prob") if k in d}
    val_only = {k: d.pop(k) for k in ("test_short_side",) if k in d}
    if d:
        raise ValueError(f"data: unknown keys {sorted(d)}")
    if "jitter_scales" in train_only:
        train_only["jitter_scales"] = tuple(train_only["jitter_scales"])
    train = AVADataset(frames, train_csv, labelmap, "train", exclusions=exclusions, **common, **train_only)
    val = AVADataset(frames, val_csv, labelmap, "val", proposals=proposals, proposal_threshold=proposal_threshold,
                     exclusions=exclusions, **common, **val_only)
    return train, val, {"labelmap": eval_labelmap, "groundtruth": val_csv, "excluded": exclusions}


# ---------------------------------------------------------------------------------------- optimisation
def lr_at(step: int, tcfg: dict, total_steps: int, spe: int) -> float:
    """Learning rate at global step ``step`` (0-based): linear warm-up, then step or cosine decay."""
    base, warm = tcfg["lr"], tcfg["warmup_steps"]
    if tcfg["schedule"] == "cosine":
        t = min(max(step - warm, 0) / max(total_steps - warm, 1), 1.0)
        final = tcfg["cosine_final_factor"]
        lr = base * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t)))
    elif tcfg["schedule"] == "step":
        epoch = step // max(spe, 1)
        lr = base * tcfg["step_gamma"] ** sum(epoch >= m for m in tcfg["step_milestones"])
    else:
        raise ValueError(f"train.schedule must be 'cosine' or 'step', got {tcfg['schedule']!r}")
    if step < warm:
        f = tcfg["warmup_start_factor"]
        lr_warm = base * (f + (1 - f) * step / warm)
        lr = min(lr, lr_warm)
    return lr


def param_groups(model: nn.Module, tcfg: dict) -> List[dict]:
    """Weight decay on conv and linear weights only; the head may get a learning-rate multiplier."""
    groups: Dict[tuple, List[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() > 1
        head = name.startswith("head.") or name.startswith("module.head.")
        groups.setdefault((decay, head), []).append(p)
    out = []
    for (decay, head), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": tcfg["weight_decay"] if decay else 0.0,
                    "lr_mult": tcfg["head_lr_mult"] if head else 1.0})
    return out


def detection_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE averaged over RoIs and classes (0 with a graph when a batch has no RoI, so every
    DDP rank still runs backward)."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


# ------------------------------------------------------------------------------------------ the runner
CONFIG_SECTIONS = ("model", "data", "train", "name", "out")
_POSITIVE_INTS = ("epochs", "batch_size", "log_every", "eval_every")
_NONNEGATIVE_INTS = ("ckpt_every", "num_workers", "warmup_steps", "seed")
_NONNEGATIVE_NUMBERS = ("lr", "momentum", "weight_decay", "clip_grad", "warmup_start_factor", "step_gamma",
                        "cosine_final_factor", "head_lr_mult")


def check_train_config(cfg: dict, tcfg: dict) -> None:
    """Config errors before anything runs: a misspelt section or key, a value of the wrong type or range
    (each error names ``train.<key>``)."""
    unknown = sorted(set(cfg) - set(CONFIG_SECTIONS))
    if unknown:
        raise ValueError(f"config: unknown top-level key(s) {unknown}; known: {list(CONFIG_SECTIONS)}")
    unknown = sorted(set(tcfg) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"train: unknown keys {unknown}; known: {sorted(TRAIN_DEFAULTS)}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    for k in _POSITIVE_INTS:
        if not (is_int(tcfg[k]) and tcfg[k] >= 1):
            raise ValueError(f"train.{k} must be an integer >= 1, got {tcfg[k]!r}")
    for k in _NONNEGATIVE_INTS:
        if not (is_int(tcfg[k]) and tcfg[k] >= 0):
            raise ValueError(f"train.{k} must be an integer >= 0, got {tcfg[k]!r}")
    for k in _NONNEGATIVE_NUMBERS:
        if not (is_num(tcfg[k]) and tcfg[k] >= 0):
            raise ValueError(f"train.{k} must be a finite number >= 0, got {tcfg[k]!r}")
    if tcfg["warmup_epochs"] is not None and not (is_num(tcfg["warmup_epochs"]) and tcfg["warmup_epochs"] >= 0):
        raise ValueError(f"train.warmup_epochs must be None or a number >= 0, got {tcfg['warmup_epochs']!r}")
    if tcfg["threads"] is not None and not (is_int(tcfg["threads"]) and tcfg["threads"] >= 1):
        raise ValueError(f"train.threads must be None or an integer >= 1, got {tcfg['threads']!r}")
    if not isinstance(tcfg["step_milestones"], (list, tuple)) or not all(is_int(m) for m in tcfg["step_milestones"]):
        raise ValueError(f"train.step_milestones must be a list of epochs, got {tcfg['step_milestones']!r}")


#: Files of a run in its output folder; a fresh (not resumed) run refuses to mix its logs with them.
RUN_FILES = ("checkpoint.pt", "metrics.csv", "eval.csv")


class Trainer:
    def __init__(self, cfg: dict, out_dir: Path, device: Optional[str] = None, quiet: bool = False,
                 overwrite: bool = False):
        """``overwrite``: a run that starts from scratch first deletes an earlier run's checkpoints and
        logs in ``out_dir``; without it, such files are an error (``--resume`` continues them)."""
        self.cfg = cfg
        self.tcfg = {**TRAIN_DEFAULTS, **(cfg.get("train") or {})}
        check_train_config(cfg, self.tcfg)
        self.out = Path(out_dir)
        self.quiet = quiet
        self.overwrite = overwrite
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch.cuda.is_available() is False (no GPU, or a CPU-only torch)")
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.distributed:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if device.startswith("cuda"):
                torch.cuda.set_device(local)
                device = f"cuda:{local}"
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                    timeout=datetime.timedelta(minutes=30))
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        self.device = torch.device(device)
        if self.tcfg["threads"]:
            # On a small CPU with data workers, one intra-op thread per process avoids OpenMP threads
            # spin-waiting for cores the workers hold.
            torch.set_num_threads(int(self.tcfg["threads"]))
        self.is_main = self.rank == 0
        if self.tcfg["deterministic"]:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

        seed_everything(self.tcfg["seed"] + self.rank)  # distinct dropout masks per rank
        # Same initial weights on every rank: build under one seed (DDP also broadcasts from rank 0).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.tcfg["seed"])
            self.model = build_model(cfg.get("model") or {}).to(self.device)
        self.train_set, self.val_set, self.eval_info = build_datasets(cfg["data"])
        self.train_items = SeededItems(self.train_set, self.tcfg["seed"])
        self.ddp = nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.distributed else self.model
        self.optimizer = torch.optim.SGD(param_groups(self.model, self.tcfg), lr=self.tcfg["lr"],
                                         momentum=self.tcfg["momentum"], nesterov=self.tcfg["nesterov"])
        amp = self.tcfg["amp"]
        if amp not in ("none", "fp16", "bf16"):
            raise ValueError(f"train.amp must be none, fp16 or bf16, got {amp!r}")
        self.amp_dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.spe = steps_per_epoch(len(self.train_set), self.tcfg["batch_size"], self.world)
        if self.spe == 0:
            raise ValueError(f"train set has {len(self.train_set)} keyframes, fewer than one step of "
                             f"batch_size {self.tcfg['batch_size']} x {self.world} processes")
        self.total_steps = self.spe * self.tcfg["epochs"]
        if self.tcfg["warmup_epochs"] is not None:
            self.tcfg["warmup_steps"] = int(round(self.tcfg["warmup_epochs"] * self.spe))
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.tb = None
        self.history: List[dict] = []

    # --- checkpoints ---------------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _gather_rng(self) -> List[dict]:
        state = rng_state()
        if not self.distributed:
            return [state]
        states = [None] * self.world
        dist.all_gather_object(states, state)
        return states

    def save_checkpoint(self, extra_path: Optional[Path] = None) -> None:
        states = self._gather_rng()  # collective: every rank takes part
        if not self.is_main:
            return
        ckpt = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "rng": states, "world_size": self.world, "config": self.cfg}
        atomic_save(ckpt, self.ckpt_path)
        if extra_path is not None:
            atomic_save(ckpt, extra_path)

    def resume(self) -> bool:
        if not self.ckpt_path.exists():
            if self.is_main:
                print(f"--resume: no checkpoint at {self.ckpt_path}, starting from scratch")
            return False
        ckpt = load_checkpoint(self.ckpt_path)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"{self.ckpt_path}: the checkpoint does not fit this config's model "
                             f"(--resume continues a run with its own config): {e}") from None
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        if ckpt["world_size"] == self.world:
            set_rng_state(ckpt["rng"][self.rank])
        elif self.is_main:
            print(f"--resume: checkpoint written by {ckpt['world_size']} processes, now {self.world}: "
                  "RNG streams (dropout) are re-seeded, the run is not bit-exact")
        if self.is_main:
            self._truncate_csv(self.out / "metrics.csv", "step", self.global_step)
            self._truncate_csv(self.out / "eval.csv", "epoch", self.epoch)
            print(f"resumed from {self.ckpt_path}: epoch {self.epoch}, step {self.step_in_epoch}/{self.spe} "
                  f"(global step {self.global_step})")
        return True

    @staticmethod
    def _truncate_csv(path: Path, key: str, upto: int) -> None:
        """Drop rows logged after the checkpoint (they are recomputed)."""
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        keep = [r for r in rows if int(r[key]) <= upto]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(keep)

    # --- logging -------------------------------------------------------------------------------------
    def _log(self, fname: str, row: dict) -> None:
        if not self.is_main:
            return
        path = self.out / fname
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self.tb is not None:
            step = row.get("step", row.get("epoch"))
            for k, v in row.items():
                if k in ("step", "epoch"):
                    continue
                try:
                    self.tb.add_scalar(f"{Path(fname).stem}/{k}", float(v), step)
                except (TypeError, ValueError):
                    pass

    # --- training ------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batches: EpochBatches) -> DataLoader:
        from stssa.data import ava_collate
        nw = self.tcfg["num_workers"]
        # An own generator: creating a loader iterator draws the workers' base seed, and from the global
        # RNG that would shift the dropout stream of a resumed run against an uninterrupted one.
        g = torch.Generator().manual_seed(self.tcfg["seed"] * 7919 + batches.epoch)
        return DataLoader(dataset, batch_sampler=batches, collate_fn=ava_collate, num_workers=nw,
                          pin_memory=self.device.type == "cuda", persistent_workers=False, generator=g)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_epoch(self, kill_after: Optional[int]) -> None:
        from tqdm import tqdm
        self.ddp.train()
        self.train_items.epoch = self.epoch
        batches = EpochBatches(len(self.train_set), self.tcfg["batch_size"], True, self.tcfg["seed"], self.epoch,
                               self.rank, self.world, start=self.step_in_epoch)
        bar = tqdm(total=self.spe, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{self.tcfg['epochs']}",
                   disable=not self.is_main or self.quiet, dynamic_ncols=True, unit="step")
        t_last = time.perf_counter()
        for batch in self._loader(self.train_items, batches):
            lr = lr_at(self.global_step, self.tcfg, self.total_steps, self.spe)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g["lr_mult"]
            clips = batch["clips"].to(self.device, non_blocking=True)
            rois = batch["rois"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.ddp(clips, rois)
            loss = detection_loss(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            grad_norm = float("nan")
            if self.tcfg["clip_grad"] > 0:
                self.scaler.unscale_(self.optimizer)
                grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg["clip_grad"]))
            elif not self.scaler.is_enabled():  # the finiteness check below needs it (one pass over the grads)
                grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), math.inf))
            self._check_finite(loss, grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step_in_epoch += 1
            self.global_step += 1

            loss_v = loss.detach()
            if self.distributed:
                dist.all_reduce(loss_v)
                loss_v /= self.world
            now = time.perf_counter()
            clips_per_s = clips.size(0) * self.world / max(now - t_last, 1e-9)
            t_last = now
            if self.global_step % self.tcfg["log_every"] == 0 or self.step_in_epoch == self.spe:
                # repr-exact loss: the resume test compares these values bit for bit.
                self._log("metrics.csv", {"step": self.global_step, "epoch": self.epoch + 1,
                                          "loss": repr(float(loss_v)), "lr": lr, "clips_per_s": round(clips_per_s, 3),
                                          "rois": int(rois.size(0)), "grad_norm": grad_norm})
            self.history.append({"step": self.global_step, "loss": float(loss_v)})
            bar.set_postfix(loss=f"{float(loss_v):.4f}", clips_s=f"{clips_per_s:.1f}", lr=f"{lr:.3g}")
            bar.update(1)
            if self.tcfg["ckpt_every"] > 0 and self.global_step % self.tcfg["ckpt_every"] == 0 \
                    and self.step_in_epoch < self.spe:
                self.save_checkpoint()
            if kill_after is not None and self.global_step >= kill_after:
                bar.close()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(17)  # no cleanup, no final checkpoint: what a SIGKILL leaves behind
        bar.close()

    def _check_finite(self, loss: torch.Tensor, grad_norm: float) -> None:
        """Stop before a non-finite loss or gradient reaches the weights (and a checkpoint). With fp16's
        GradScaler an inf gradient is normal (the step is skipped and the scale lowered); a NaN loss is not."""
        step = self.global_step + 1
        bad = None
        if not math.isfinite(float(loss.detach())):
            bad = f"the loss is {float(loss.detach())}"
        elif not self.scaler.is_enabled() and not math.isfinite(grad_norm):
            bad = f"the gradient norm is {grad_norm}"
        if bad is not None:
            hint = ""
            if self.device.type == "cpu" and self.amp_dtype == torch.bfloat16:
                hint = ("; on CPU, PyTorch's oneDNN bf16 conv3d weight gradient is NaN or wrong where a temporal "
                        "kernel is longer than the clip at its layer (kt > T; measured on torch 2.14.1); the "
                        "backbone and model.use_fused=true route around it, the reference head's Conv3d's "
                        "(use_fused=false) do not: use train.amp=none, longer clips or the fused head")
            raise FloatingPointError(
                f"step {step} (epoch {self.epoch + 1}): {bad}; stopped before the optimizer step, the last "
                f"checkpoint is untouched (train.amp={self.tcfg['amp']}, train.lr={self.tcfg['lr']}){hint}")

    @torch.no_grad()
    def evaluate(self, tag: str) -> Optional[dict]:
        """Detections on the val set (official CSV) and frame-mAP; returns the evaluator's dict on rank 0."""
        from stssa.evaluate import evaluate_frame_map, rows_from_predictions, write_detections_csv
        from stssa.data import read_labelmap
        self.ddp.eval()
        _, eval_ids = read_labelmap(self.eval_info["labelmap"])
        batches = EpochBatches(len(self.val_set), self.tcfg["batch_size"], False, rank=self.rank, world=self.world)
        rows = []
        for batch in self._loader(self.val_set, batches):
            with self._autocast():
                logits = self.model(batch["clips"].to(self.device), batch["rois"].to(self.device))
            rows.extend(rows_from_predictions(batch["meta"], torch.sigmoid(logits.float()), class_ids=eval_ids))
        if self.distributed:
            parts = [None] * self.world
            dist.all_gather_object(parts, rows)
            rows = [r for p in parts for r in p]
        if not self.is_main:
            return None
        det_path = self.out / f"detections_{tag}.csv"
        write_detections_csv(det_path, rows)
        return evaluate_frame_map(self.eval_info["labelmap"], self.eval_info["groundtruth"], det_path,
                                  self.eval_info["excluded"])

    def _start_fresh(self) -> None:
        """A run from step 0 into a folder holding another run: delete it with ``overwrite``, else refuse
        (its metrics.csv / eval.csv would get a second run's rows appended, its checkpoints replaced)."""
        old = [p for p in (*[self.out / f for f in RUN_FILES], *self.out.glob("checkpoint_epoch*.pt"),
                           *self.out.glob("detections_epoch*.csv")) if p.exists()]
        if not old and not (self.out / "tb").exists():
            return
        if not self.overwrite:
            raise FileExistsError(f"{self.out} holds an earlier run ({', '.join(sorted(p.name for p in old)) or 'tb/'}): "
                                  "pass --resume to continue it, --overwrite to start over, or another --out")
        import shutil
        for p in old:
            p.unlink()
        shutil.rmtree(self.out / "tb", ignore_errors=True)

    def fit(self, kill_after: Optional[int] = None) -> Optional[dict]:
        if self.is_main:
            if self.global_step == 0 and self.epoch == 0:
                self._start_fresh()
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tb"))
            except ImportError:  # tensorboard is in requirements.txt; without it the CSV logs remain
                print("tensorboard not installed: CSV logs only")
        result = None
        while self.epoch < self.tcfg["epochs"]:
            if self.step_in_epoch < self.spe:
                self.train_epoch(kill_after)
            # End of epoch: checkpoint first (a kill during evaluation resumes at the evaluation).
            self.save_checkpoint(self.out / f"checkpoint_epoch{self.epoch + 1}.pt")
            if (self.epoch + 1) % self.tcfg["eval_every"] == 0 or self.epoch + 1 == self.tcfg["epochs"]:
                t0 = time.perf_counter()
                result = self.evaluate(f"epoch{self.epoch + 1}")
                if self.is_main:
                    self._log("eval.csv", {"epoch": self.epoch + 1, "step": self.global_step,
                                           "frame_mAP": result["mAP"], "eval_s": round(time.perf_counter() - t0, 2)})
                    if not self.quiet:
                        print(f"epoch {self.epoch + 1}: frame-mAP@0.5 = {result['mAP']:.4f}")
            self.epoch += 1
            self.step_in_epoch = 0
            self.save_checkpoint()
        if self.tb is not None:
            self.tb.close()
        return result

    def close(self, finished: bool = True) -> None:
        """Tear the process group down; after a finished run, on every rank together.

        Without the barrier, a rank that finishes first destroys its gloo pairs while its peer may still
        be sending; and the DDP wrapper's reducer holds the process group, so it is dropped first -- left
        alive, its gloo threads are destroyed during interpreter finalisation, which can abort the
        process ("terminate called without an active exception", seen once in CI). After an error there
        is no barrier: the failing rank must exit at once so that torchrun stops the others.
        """
        if not (self.distributed and dist.is_initialized()):
            return
        if finished:
            dist.barrier()
        self.ddp = self.model
        gc.collect()
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stssa.train", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (a path, or a name in stssa/configs)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if it exists")
    ap.add_argument("--out", help="output folder (default: runs/<config name>)")
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. train.lr=0.01 model.use_fused=false")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--overwrite", action="store_true",
                    help="a run from scratch first deletes an earlier run's checkpoints and logs in --out")
    ap.add_argument("--kill-after-steps", type=int, default=None,
                    help="testing aid: exit abruptly (no checkpoint, no cleanup) after this global step, "
                         "as a SIGKILL would; then run again with --resume")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    out = Path(args.out or cfg.get("out") or Path("runs") / cfg["name"])
    trainer = Trainer(cfg, out, device=args.device, quiet=args.quiet, overwrite=args.overwrite)
    finished = False
    try:
        if args.resume:
            trainer.resume()
        trainer.fit(kill_after=args.kill_after_steps)
        finished = True
    finally:
        trainer.close(finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
