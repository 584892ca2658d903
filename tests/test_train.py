"""Tests of stssa.train on a tiny synthetic AVA-format set: the loss falls, evaluation writes official
detections and a frame-mAP, checkpoints round-trip, a run killed mid-epoch resumes bit-exactly, and a
two-process gloo run (torchrun) works."""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stssa.models import build_model
from stssa.train import TRAIN_DEFAULTS, EpochBatches, Trainer, build_datasets, lr_at
from stssa.utils import load_checkpoint, load_config

ROOT = Path(__file__).resolve().parents[1]

# These runs use the reference path (use_fused=False), which pools RoIs with torchvision, which a CPU-only torch may lack.
needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="the reference path needs torchvision, which is not installed")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; and the configs below run their subprocesses with threads: 1
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from stssa.data.synthetic import make_dataset
    out = tmp_path_factory.mktemp("synthetic")
    make_dataset(out, videos=4, seconds=3, seed=3, height=48, width=64, val_fraction=0.25)
    return out


def _config(root: Path, head: dict, **train) -> dict:
    return {
        "name": "test_tiny",
        "model": {"backbone": {"depths": [1, 1, 1, 1], "width": 4, "expansion": 2}, "head": head,
                  "num_classes": 80, "use_fused": False},
        "data": {"root": str(root), "labelmap": "annotations/ava_action_list_v2.2_for_activitynet_2019.pbtxt",
                 "train_csv": "annotations/ava_train_v2.2.csv", "val_csv": "annotations/ava_val_v2.2.csv",
                 "exclusions": "annotations/ava_val_excluded_timestamps_v2.2.csv",
                 "val_proposals": "annotations/ava_dense_proposals_val.pkl", "proposal_threshold": 0.5,
                 "num_frames": 4, "sampling_rate": 4, "crop_size": 32, "jitter_scales": [32, 40], "num_classes": 80},
        "train": {"epochs": 2, "batch_size": 2, "lr": 0.05, "warmup_steps": 2, "schedule": "cosine",
                  "ckpt_every": 2, "eval_every": 1, "num_workers": 0, "threads": 1, "seed": 5, **train},
    }


STSSA_TINY = {"type": "stssa", "axes": ["spatial", "temporal"], "num_layers": 1, "embed_dim": 8, "slow_kernel": 3,
              "layernorm": True, "dropout": 0.3}


def _rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


# ----------------------------------------------------------------------------------------- unit parts
def test_lr_schedule_warmup_cosine_and_step():
    t = {**TRAIN_DEFAULTS, "lr": 1.0, "warmup_steps": 10, "warmup_start_factor": 0.1, "schedule": "cosine"}
    assert lr_at(0, t, 110, 10) == pytest.approx(0.1)
    assert lr_at(5, t, 110, 10) == pytest.approx(0.55)
    assert lr_at(10, t, 110, 10) == pytest.approx(1.0)
    assert lr_at(60, t, 110, 10) == pytest.approx(0.5)
    assert lr_at(110, t, 110, 10) == pytest.approx(0.0)
    s = {**t, "schedule": "step", "step_milestones": [3, 5], "step_gamma": 0.1, "warmup_steps": 0}
    assert [lr_at(e * 10, s, 100, 10) for e in (0, 2, 3, 4, 5, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_epoch_batches_shard_and_resume():
    full = EpochBatches(23, 2, True, seed=1, epoch=4, rank=0, world=1).batches()
    assert len(full) == 11 and len({i for b in full for i in b}) == 22
    assert full == EpochBatches(23, 2, True, seed=1, epoch=4).batches()  # a function of (seed, epoch)
    assert full != EpochBatches(23, 2, True, seed=1, epoch=5).batches()
    assert EpochBatches(23, 2, True, seed=1, epoch=4, start=7).batches() == full[7:]
    r0 = EpochBatches(23, 2, True, seed=1, epoch=4, rank=0, world=2).batches()
    r1 = EpochBatches(23, 2, True, seed=1, epoch=4, rank=1, world=2).batches()
    assert len(r0) == len(r1) == 5
    assert not {i for b in r0 for i in b} & {i for b in r1 for i in b}
    ev = [EpochBatches(7, 2, False, rank=r, world=2).batches() for r in range(2)]
    assert sorted(i for e in ev for b in e for i in b) == list(range(7))


def test_config_inheritance_and_overrides(tmp_path):
    cfg = load_config("stssa_ssfa_tsfa_gap2048_2l_ln", ["train.lr=0.02", "model.head.pool=max"])
    assert cfg["model"]["backbone"]["depths"] == [3, 4, 6, 3]           # from the _base_
    assert cfg["model"]["head"]["layernorm"] is True and cfg["model"]["head"]["pool"] == "max"
    assert cfg["train"]["lr"] == 0.02 and cfg["name"] == "stssa_ssfa_tsfa_gap2048_2l_ln"
    with pytest.raises(ValueError, match="section.key=value"):
        load_config("demo_stssa", ["train.lr"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------------- training runs
@needs_torchvision
def test_short_run_loss_falls_and_evaluates(synthetic, tmp_path):
    cfg = _config(synthetic, STSSA_TINY, epochs=6, lr=0.5, eval_every=6)
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    result = trainer.fit()
    losses = [h["loss"] for h in trainer.history]
    spe = trainer.spe
    first, last = sum(losses[:spe]) / spe, sum(losses[-spe:]) / spe
    assert last < 0.5 * first, f"loss did not fall: first epoch {first:.4f}, last epoch {last:.4f}"
    out = tmp_path / "run"
    assert 0.0 <= result["mAP"] <= 1.0 and result["per_class"]
    det = (out / "detections_epoch6.csv").read_text().splitlines()
    assert det and all(len(r.split(",")) == 8 for r in det)
    ev = _rows(out / "eval.csv")
    assert [int(r["epoch"]) for r in ev] == [6] and float(ev[0]["frame_mAP"]) == pytest.approx(result["mAP"])
    assert len(_rows(out / "metrics.csv")) == 6 * spe
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    tb_loss = [e.value for e in tb.Scalars("metrics/loss")]
    assert tb_loss == pytest.approx(losses, rel=1e-6) and "eval/frame_mAP" in tb.Tags()["scalars"]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files

    # Checkpoint round trip: a fresh model with the checkpoint's weights gives the same logits.
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 6 and ckpt["step_in_epoch"] == 0 and ckpt["global_step"] == 6 * spe
    fresh = build_model(cfg["model"], load_pretrained=False)
    fresh.load_state_dict(ckpt["model"])
    model = trainer.model.eval()
    fresh.eval()
    x = torch.randn(2, 3, 4, 32, 32)
    rois = torch.tensor([[0, 2.0, 3.0, 20.0, 30.0], [1, 5.0, 1.0, 31.0, 17.0]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, rois), model(x, rois), rtol=0, atol=0)
    opt = torch.optim.SGD(trainer.optimizer.param_groups, lr=0.1)
    opt.load_state_dict(ckpt["optimizer"])  # loads into the same parameter groups


@needs_torchvision
def test_kill_mid_epoch_then_resume_is_bit_exact(synthetic, tmp_path):
    """Run A uninterrupted; run B killed (os._exit, no final checkpoint) one step after a periodic
    checkpoint in the middle of epoch 2, then resumed from that checkpoint. B's logged losses (the step
    after the checkpoint is recomputed after the resume) and final weights equal A's bit for bit: the
    batches, the augmentation and the dropout masks are functions of the seed, epoch and step, and the
    CPU kernels are deterministic with one thread. num_workers=1 exercises the worker path."""
    cfg = _config(synthetic, STSSA_TINY, epochs=2, num_workers=1, eval_every=2, ckpt_every=2)
    path = _write(cfg, tmp_path / "cfg.yaml")
    a = Trainer(cfg, tmp_path / "A", device="cpu", quiet=True)
    res_a = a.fit()
    spe = a.spe
    assert spe >= 3
    ckpt_step = spe + 2            # periodic checkpoint inside epoch 2 (ckpt_every=2 counts global steps)
    ckpt_step -= ckpt_step % 2
    kill = ckpt_step + 1
    assert spe < kill < 2 * spe
    cmd = [sys.executable, "-m", "stssa.train", "--config", str(path), "--out", str(tmp_path / "B"), "--quiet",
           "--device", "cpu"]
    p = subprocess.run(cmd + ["--kill-after-steps", str(kill)], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 17, p.stderr[-3000:]
    assert [int(r["step"]) for r in _rows(tmp_path / "B" / "metrics.csv")] == list(range(1, kill + 1))
    assert load_checkpoint(tmp_path / "B" / "checkpoint.pt")["global_step"] == ckpt_step
    p = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and f"global step {ckpt_step}" in p.stdout
    rows_a, rows_b = _rows(tmp_path / "A" / "metrics.csv"), _rows(tmp_path / "B" / "metrics.csv")
    assert [r["step"] for r in rows_b] == [str(s) for s in range(1, 2 * spe + 1)]
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]
    wa, wb = load_checkpoint(tmp_path / "A" / "checkpoint.pt"), load_checkpoint(tmp_path / "B" / "checkpoint.pt")
    for k, v in wa["model"].items():
        torch.testing.assert_close(wb["model"][k], v, rtol=0, atol=0, msg=k)
    assert float(_rows(tmp_path / "B" / "eval.csv")[-1]["frame_mAP"]) == res_a["mAP"]


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_cpu_run_with_kernels_longer_than_the_clip(synthetic, tmp_path, fused):
    """CPU bf16 with 4-frame clips: the stem's 5-tap conv, the res4/res5 3-tap convs (T = 4, 2) and the
    head's 3-tap slow projections all have kt > T, where oneDNN's bf16 weight gradient is NaN (torch
    2.14.1). The backbone's Conv3d and the fused head route around it: finite losses and gradients."""
    if not fused and importlib.util.find_spec("torchvision") is None:
        pytest.skip("the reference path needs torchvision")
    head = STSSA_TINY if fused else {"type": "baseline"}
    cfg = _config(synthetic, head, epochs=1, amp="bf16", eval_every=1)
    cfg["model"]["use_fused"] = fused
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    trainer.fit()  # raises FloatingPointError at a NaN loss or gradient
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert rows and all(float(r["grad_norm"]) >= 0 for r in rows)


@needs_torchvision
def test_bf16_autocast_and_baseline_head_run(synthetic, tmp_path):
    cfg = _config(synthetic, {"type": "baseline"}, epochs=1, amp="bf16", clip_grad=1.0, eval_every=1)
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    result = trainer.fit()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert all(float(r["grad_norm"]) >= 0 for r in rows)  # clipping computed the norm
    assert 0.0 <= result["mAP"] <= 1.0


@needs_torchvision
def test_two_process_gloo_torchrun(synthetic, tmp_path):
    """``torchrun --nproc_per_node=2``: DDP over gloo, each rank its shard, rank 0 logs and checkpoints,
    evaluation gathers every rank's detections."""
    cfg = _config(synthetic, STSSA_TINY, epochs=1, batch_size=1, eval_every=1)
    path = _write(cfg, tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "stssa.train",
           "--config", str(path), "--out", str(tmp_path / "D"), "--quiet", "--device", "cpu"]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    train_set, val_set, _ = build_datasets(cfg["data"])
    rows = _rows(tmp_path / "D" / "metrics.csv")  # rank 0 only: one row per step
    ckpt = load_checkpoint(tmp_path / "D" / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert len(rows) == ckpt["global_step"] == len(train_set) // 2
    # Every val keyframe was scored: rank 0 gathered rank 1's detections.
    det_keys = {(v, int(t)) for v, t, *_ in
                (line.split(",") for line in (tmp_path / "D" / "detections_epoch1.csv").read_text().splitlines())}
    assert det_keys == set(val_set.keyframes) and len(val_set) >= 2


# ------------------------------------------------------------------------------------------- GPU runs
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STSSA_GPU = {**STSSA_TINY, "embed_dim": 32}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_gpu_amp_fused_run_loss_falls(synthetic, tmp_path, amp):
    """One GPU, the fused ops, AMP (fp16 with the GradScaler, bf16 without): finite losses that fall, an
    evaluation, and a checkpoint that carries the scaler state."""
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    cfg = _config(synthetic, STSSA_GPU, epochs=4, lr=0.5, eval_every=4, amp=amp, clip_grad=5.0)
    cfg["model"]["use_fused"] = True
    trainer = Trainer(cfg, tmp_path / "run", device="cuda", quiet=True)
    result = trainer.fit()
    losses = [h["loss"] for h in trainer.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    spe = trainer.spe
    assert sum(losses[-spe:]) < sum(losses[:spe]), losses
    assert 0.0 <= result["mAP"] <= 1.0
    assert trainer.scaler.is_enabled() == (amp == "fp16")


@pytest.mark.gpu
@gpu
def test_gpu_nccl_torchrun(synthetic, tmp_path):
    """``torchrun`` on the GPU: the NCCL process group (one rank per GPU, as many as there are, at most 2)."""
    n = min(2, torch.cuda.device_count())
    cfg = _config(synthetic, STSSA_GPU, epochs=1, batch_size=1, eval_every=1)
    cfg["model"]["use_fused"] = True
    path = _write(cfg, tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--standalone", "-m",
           "stssa.train", "--config", str(path), "--out", str(tmp_path / "G"), "--quiet", "--device", "cuda"]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    ckpt = load_checkpoint(tmp_path / "G" / "checkpoint.pt")
    assert ckpt["world_size"] == n


# ------------------------------------------------------------------------------------ config and errors
@pytest.mark.parametrize("change, match", [
    (lambda c: c.update(trian=c.pop("train")), r"config: unknown top-level key\(s\) \['trian'\]"),
    (lambda c: c["train"].update(eval_every=0), r"train\.eval_every must be an integer >= 1, got 0"),
    (lambda c: c["train"].update(log_every=0), r"train\.log_every must be an integer >= 1"),
    (lambda c: c["train"].update(batch_size=-1), r"train\.batch_size must be an integer >= 1, got -1"),
    (lambda c: c["train"].update(batch_size=2.5), r"train\.batch_size must be an integer >= 1"),
    (lambda c: c["train"].update(lr="abc"), r"train\.lr must be a finite number >= 0, got 'abc'"),
    (lambda c: c["train"].update(num_workers=-1), r"train\.num_workers must be an integer >= 0"),
    (lambda c: c["train"].update(threads=0), r"train\.threads must be None or an integer >= 1"),
    (lambda c: c["data"].pop("labelmap"), r"data: missing key\(s\) \['labelmap'\]"),
    (lambda c: c["model"]["head"].update(heads=0), r"heads must be a positive int, got 0"),
])
def test_config_errors_name_the_key(synthetic, tmp_path, change, match):
    cfg = _config(synthetic, dict(STSSA_TINY))
    change(cfg)
    with pytest.raises(ValueError, match=match):
        Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    assert not (tmp_path / "run").exists()


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("train: {lr: 0.1}\n")
    with pytest.raises(ValueError, match=r"override 'train.lr=\[1': the value is not valid YAML"):
        load_config(good, ["train.lr=[1"])


def test_cuda_device_without_a_gpu_is_a_clear_error(synthetic, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match=r"device 'cuda': torch.cuda.is_available\(\) is False"):
        Trainer(_config(synthetic, STSSA_TINY), tmp_path / "run", device="cuda", quiet=True)


@needs_torchvision
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_loss_or_gradient_stops_before_the_step(synthetic, tmp_path, monkeypatch, where):
    """A NaN stops the run at that step with an error, before the optimizer step and any checkpoint
    (a bf16 CPU run used to train on to NaN weights, exit 0, and overwrite the checkpoint)."""
    import stssa.train as tr
    cfg = _config(synthetic, STSSA_TINY, epochs=1, ckpt_every=1)
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    calls, loss_fn = [], tr.detection_loss

    def poisoned(logits, labels):  # step 2: a NaN loss, or a finite loss with a NaN gradient
        calls.append(1)
        loss = loss_fn(logits, labels)
        if len(calls) != 2:
            return loss
        return loss * float("nan") if where == "loss" else loss + _nan_grad(logits)

    monkeypatch.setattr(tr, "detection_loss", poisoned)
    what = "loss" if where == "loss" else "gradient norm"
    with pytest.raises(FloatingPointError, match=rf"step 2 \(epoch 1\): the {what} is nan; stopped before"):
        trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # step 1's, not overwritten
    assert ckpt["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class _NanGrad(torch.autograd.Function):
    """0 in the forward, a NaN gradient in the backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        return torch.full(ctx.shape, float("nan"))


def _nan_grad(logits):
    return _NanGrad.apply(logits)


@needs_torchvision
def test_fresh_run_into_an_earlier_run_refuses_or_overwrites(synthetic, tmp_path):
    cfg = _config(synthetic, STSSA_TINY, epochs=1, eval_every=1)
    Trainer(cfg, tmp_path / "run", device="cpu", quiet=True).fit()
    n = len(_rows(tmp_path / "run" / "metrics.csv"))
    with pytest.raises(FileExistsError, match=r"holds an earlier run .*--resume .*--overwrite"):
        Trainer(cfg, tmp_path / "run", device="cpu", quiet=True).fit()
    assert len(_rows(tmp_path / "run" / "metrics.csv")) == n
    Trainer(cfg, tmp_path / "run", device="cpu", quiet=True, overwrite=True).fit()
    assert len(_rows(tmp_path / "run" / "metrics.csv")) == n  # the new run's rows only
    assert len(_rows(tmp_path / "run" / "eval.csv")) == 1


@needs_torchvision
def test_checkpoint_files_errors_permissions_and_pretrained(synthetic, tmp_path):
    """Training checkpoints: readable by others as the umask allows (not mkstemp's 0600); usable as
    model.pretrained (torch.load with weights_only=True); damaged or mismatched ones are errors naming the
    file."""
    from stssa.models.checkpoint import read_state_dict
    cfg = _config(synthetic, STSSA_TINY, epochs=1, eval_every=1)
    old = os.umask(0o022)
    try:
        Trainer(cfg, tmp_path / "run", device="cpu", quiet=True).fit()
    finally:
        os.umask(old)
    ckpt_path = tmp_path / "run" / "checkpoint.pt"
    assert ckpt_path.stat().st_mode & 0o777 == 0o644
    sd = read_state_dict(ckpt_path)
    assert set(sd) == set(load_checkpoint(ckpt_path)["model"])
    # resume: damaged file, another model
    data = ckpt_path.read_bytes()
    ckpt_path.write_bytes(data[: len(data) // 2])
    t = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    with pytest.raises(ValueError, match=rf"{ckpt_path.name}: cannot read the checkpoint"):
        t.resume()
    with pytest.raises(ValueError, match=rf"{ckpt_path.name}: cannot read the checkpoint with torch.load"):
        read_state_dict(ckpt_path)
    ckpt_path.write_bytes(data)
    wider = _config(synthetic, {**STSSA_TINY, "embed_dim": 16}, epochs=1)
    with pytest.raises(ValueError, match=rf"{ckpt_path.name}: the checkpoint does not fit this config's model"):
        Trainer(wider, tmp_path / "run", device="cpu", quiet=True).resume()
