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
   ``results.png``. ``python -m stssa.ablation`` runs every row of the paper's Table 4.2 over 3 seeds.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

from stssa.ablation import DEMO_ROWS, PROTOCOLS, ROW_NAMES, markdown_table, run_ablation

DATA_ARGS = PROTOCOLS["demo"]["data"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stssa.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/synthetic_ablation", help="dataset folder (created)")
    ap.add_argument("--out", default="runs/demo", help="backbone run, results.json / .md / .png")
    ap.add_argument("--rows", nargs="*", default=DEMO_ROWS, choices=ROW_NAMES, help="heads to train")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    data, out = Path(args.data), Path(args.out)
    protocol = copy.deepcopy(PROTOCOLS["demo"])
    doc = run_ablation(args.rows, args.seeds, out, data, protocol, "demo", quiet=args.quiet)
    print("\nframe-mAP@0.5 on the synthetic val split (official AVA protocol)\n")
    print(markdown_table(doc))
    print(f"[demo] wrote {out / 'results.json'}, results.md, results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
