"""CPU demo: ``python -m stssa.demo`` (``make demo``): the ablation's protocol (:mod:`stssa.ablation`, the
same code) for two heads and one seed.

1. Writes the synthetic AVA-format dataset (:mod:`stssa.data.synthetic`: persons whose actions need motion,
   order, repetition count, duration or an in-box interaction to be told apart, plus two appearance
   classes) to ``data/synthetic_ablation`` (kept and reused when it exists with the same arguments).
2. Trains the shared tiny I3D once (``synthetic_ablation.yaml``) and caches its frozen res5 RoI features
   (both reused from ``--out`` when present).
3. Trains the PySlowFast-style baseline head and the paper's STSSA head (``synthetic_baseline.yaml``,
   ``synthetic_ssfa_tsfa_gap2048_2l_ln.yaml``) on the cache and evaluates both on the val proposals
   (official frame-mAP protocol), next to chance (the same proposals with uniformly random scores).
4. Prints the table and writes ``runs/demo/results.json`` (the ablation's format), ``results.md`` and
   ``results.png``, and each head's val detections as ``runs/demo/<baseline|stssa>/detections_epoch<E>.csv``
   (official CSV form). ``python -m stssa.ablation`` runs every row of Table 4.2 over 3 seeds.
5. Writes ``runs/demo/keyframes.png`` (a few val keyframes: the STSSA head's top actions beside the ground
   truth) and ``runs/demo/per_class_ap.png`` (:func:`stssa.visualize.demo_pictures`).
"""
from __future__ import annotations

import argparse
import sys
import copy
from pathlib import Path

from stssa.ablation import DEMO_ROWS, PROTOCOLS, ROW_NAMES, markdown_table, run_ablation, write_head_detections

DATA_ARGS = PROTOCOLS["demo"]["data"]
#: The demo's short names of its rows (run folders under ``--out``).
SHORT = {"baseline": "baseline", "ssfa_tsfa_gap2048_2l_ln": "stssa"}


def head_results(doc: dict, out: Path) -> dict:
    """Seed 0 of each row as ``{short name: {"config", "frame_mAP", "per_class", "names", "steps",
    "head_params"}, "chance": {"frame_mAP"}}``, the form :func:`stssa.visualize.demo_pictures` reads, with
    each head's val detections written to ``out/<short name>/detections_epoch<E>.csv``."""
    results = {}
    for r in doc["rows"]:
        key = SHORT.get(r["name"], r["name"])
        run = r["runs"][0]
        epochs = doc["head_recipe"]["epochs"]
        write_head_detections(out, out, r["name"], run["seed"], out / key / f"detections_epoch{epochs}.csv")
        results[key] = {"config": r["config"], "frame_mAP": run["mAP"], "steps": run["steps"],
                        "head_params": r["head_params"], "per_class": {int(c): v for c, v in r["per_class"].items()},
                        "names": {int(c): doc["class_names"][c] for c in r["per_class"]}}
    results["chance"] = {"frame_mAP": doc["chance"], "description": "same proposals, uniformly random scores"}
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stssa.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/synthetic_ablation", help="dataset folder (created)")
    ap.add_argument("--out", default="runs/demo", help="backbone run, results.json / .md / .png")
    ap.add_argument("--rows", nargs="*", default=DEMO_ROWS, choices=ROW_NAMES, help="heads to train")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")

    data, out = Path(args.data), Path(args.out)
    protocol = copy.deepcopy(PROTOCOLS["demo"])
    try:
        doc = run_ablation(args.rows, args.seeds, out, data, protocol, "demo", quiet=args.quiet)
    except (ValueError, FileExistsError) as e:  # argument and data-folder errors, before any training
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\nframe-mAP@0.5 on the synthetic val split (official AVA protocol)\n")
    print(markdown_table(doc))
    print(f"[demo] wrote {out / 'results.json'}, results.md, results.png")
    results = head_results(doc, out)
    if len(results) > 1:  # pictures: a few val keyframes (top actions beside the ground truth) and per-class AP
        from stssa.visualize import demo_pictures
        pics = demo_pictures(data, out, results)
        print(f"[demo] wrote {pics['keyframes']} and {pics['per_class_ap']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
