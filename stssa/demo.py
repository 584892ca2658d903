"""CPU demo: ``python -m stssa.demo`` (``make demo``).

1. Writes the synthetic AVA-format dataset (``stssa.data.synthetic``: persons whose actions -- walk vs
   run, get up vs bend, jump, wave, talk/listen, fight -- need several frames to be told apart) to
   ``data/synthetic`` (kept and reused when it exists with the same generator arguments).
2. Trains the PySlowFast-style baseline head and the STSSA head (``stssa/configs/demo_*.yaml``: the same
   tiny I3D trained from scratch, the same recipe) with :mod:`stssa.train`, one after the other.
3. Evaluates both on the val split (proposals, official frame-mAP protocol), next to chance: the same
   proposals with uniformly random scores (mean over 5 draws).
4. Prints the frame-mAP table and writes it to ``runs/demo/results.json`` (device, threads, timings, commit).
5. Writes ``runs/demo/keyframes.png`` (a few val keyframes: the STSSA head's top actions beside the ground
   truth) and ``runs/demo/per_class_ap.png`` (:func:`stssa.visualize.demo_pictures`).

``--epochs`` and ``--set`` override the configs (e.g. ``--set model.use_fused=false`` runs the
plain-PyTorch reference path).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from stssa.utils import load_config

DATA_ARGS = {"videos": 20, "seconds": 10, "seed": 0, "height": 96, "width": 128}
HEADS = (("baseline", "demo_baseline", "PySlowFast head: temporal avg, 2-D RoIAlign, max pool"),
         ("stssa", "demo_stssa", "STSSA head: SSFA + TSFA, slow + fast branches, GAP"))


def ensure_dataset(root: Path) -> None:
    from stssa.data.synthetic import make_dataset
    info = root / "synthetic_info.json"
    if info.exists():
        args = json.loads(info.read_text()).get("args", {})
        if all(args.get(k) == v for k, v in DATA_ARGS.items()):
            print(f"[demo] reusing the synthetic dataset in {root}")
            return
    t0 = time.perf_counter()
    make_dataset(root, overwrite=True, **DATA_ARGS)
    print(f"[demo] wrote the synthetic dataset to {root} in {time.perf_counter() - t0:.1f}s")


def chance_map(det_csv: Path, eval_info: dict, draws: int = 5) -> float:
    """frame-mAP of the same detection rows with uniformly random scores (mean over ``draws``)."""
    from stssa.evaluate import evaluate_frame_map
    rows = [line.split(",") for line in det_csv.read_text().splitlines() if line]
    maps = []
    for s in range(draws):
        rng = np.random.default_rng(s)
        det = [(r[0], int(r[1]), *map(float, r[2:6]), int(r[6]), float(rng.random())) for r in rows]
        maps.append(evaluate_frame_map(eval_info["labelmap"], eval_info["groundtruth"], det, eval_info["excluded"])["mAP"])
    return float(np.mean(maps))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stssa.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/synthetic", help="dataset folder (created)")
    ap.add_argument("--out", default="runs/demo", help="run folders and results.json")
    ap.add_argument("--epochs", type=int, help="override train.epochs of both configs")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both runs")
    ap.add_argument("--heads", nargs="*", default=[h[0] for h in HEADS], choices=[h[0] for h in HEADS])
    args = ap.parse_args(argv)

    from stssa.train import Trainer
    data, out = Path(args.data), Path(args.out)
    ensure_dataset(data)
    results = {}
    for key, cfg_name, desc in HEADS:
        if key not in args.heads:
            continue
        overrides = [f"data.root={data}"] + ([f"train.epochs={args.epochs}"] if args.epochs else []) + args.set
        cfg = load_config(cfg_name, overrides)
        run_dir = out / key
        if (run_dir / "checkpoint.pt").exists():  # a fresh run each time: the timing is part of the output
            for p in run_dir.glob("*"):
                if p.is_file():
                    p.unlink()
        print(f"[demo] training {cfg_name} ({desc}) -> {run_dir}")
        t0 = time.perf_counter()
        trainer = Trainer(cfg, run_dir, device="cpu")
        res = trainer.fit()
        wall = time.perf_counter() - t0
        head_params = sum(p.numel() for p in trainer.model.head.parameters())
        det_csv = run_dir / f"detections_epoch{trainer.tcfg['epochs']}.csv"
        results[key] = {"config": cfg_name, "description": desc, "frame_mAP": res["mAP"], "train_eval_s": wall,
                        "steps": trainer.global_step, "head_params": head_params,
                        "use_fused": trainer.model.use_fused,
                        "per_class": {int(c): r["ap"] for c, r in res["per_class"].items()},
                        "names": {int(c): r["name"] for c, r in res["per_class"].items()}}
        results.setdefault("chance", {"frame_mAP": chance_map(det_csv, trainer.eval_info),
                                      "description": "same proposals, uniformly random scores (mean of 5)"})

    rows = [(k, v) for k, v in results.items() if k != "chance"]
    print("\nframe-mAP@0.5 on the synthetic val split (official AVA protocol)")
    print(f"{'head':<10} {'frame-mAP':>10} {'train+eval s':>13} {'steps':>6} {'head params':>12}")
    for k, v in rows:
        print(f"{k:<10} {v['frame_mAP']:>10.4f} {v['train_eval_s']:>13.1f} {v['steps']:>6d} {v['head_params']:>12,d}")
    print(f"{'chance':<10} {results['chance']['frame_mAP']:>10.4f}")
    if rows:
        names = rows[0][1]["names"]
        print("\nper-class AP:")
        print(f"{'id':>4} {'class':<28}" + "".join(f" {k:>9}" for k, _ in rows))
        for c, name in names.items():
            print(f"{c:>4} {name[:28]:<28}" + "".join(f" {v['per_class'].get(c, float('nan')):>9.3f}" for _, v in rows))
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": _commit(),
           "device": f"CPU: {_cpu_name()}, {os.cpu_count()} cores, "
                     f"torch threads {torch.get_num_threads()}", "dataset": DATA_ARGS, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\n[demo] wrote {out / 'results.json'}")
    if rows:  # pictures: a few val keyframes (top actions beside the ground truth) and per-class AP
        from stssa.visualize import demo_pictures
        pics = demo_pictures(data, out, results)
        print(f"[demo] wrote {pics['keyframes']} and {pics['per_class_ap']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
