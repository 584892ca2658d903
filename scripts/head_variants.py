#!/usr/bin/env python3
"""Count the Triton kernel variants one forward + backward of the STSSA head compiles, per arch.

    python scripts/head_variants.py [--arch sm_90 ...] [--shape ava] [--dtype bf16] [--json OUT]

Counted, not estimated: the head's blocks (temporal_proj + attention3d per branch, LayerNorm) run once
forward and backward on CPU under the Triton interpreter with every Triton launcher call recorded and
no kernel executed (a subprocess with TRITON_INTERPRET=1); the recorded calls are then replayed for
each arch with the plans/tiles that arch picks, and each launch's JIT specialisation key is computed
with Triton's own binder. Distinct keys are distinct compiles on a cold cache.

The RoI count K of a training batch varies from step to step. It enters only arguments the kernels do
not specialise on (``do_not_specialize``), so every K > 1 compiles the same variants; the head is run
at two RoI counts (3 and 16: 16 makes the sequence counts divisible by 16, which a fully specialised
kernel would compile again) and the report gives the variants of both together, with and without the
``do_not_specialize`` marks. Small K keeps the CPU run light.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# benchmarks/head.py's "ava" head (C=2048, T=16, embed 2048, 2 layers, LayerNorm) and a small one
SHAPES = {
    "ava": dict(K=(3, 16), C=2048, T=16, embed=2048, layers=2),
    "cpu_small": dict(K=(3, 16), C=256, T=8, embed=256, layers=2),
}


def record(shape: dict) -> list[dict]:
    """Launcher calls of one head forward + backward (run in a TRITON_INTERPRET=1 process)."""
    import torch

    from stssa.models.heads import STSSAHead
    from stssa_kernels.compile_check import encode_calls
    from stssa_kernels.triton._launch import capture_launches, record_launcher_calls

    torch.manual_seed(0)
    head = STSSAHead(shape["C"], num_classes=80, axes=("spatial", "temporal"), num_layers=shape["layers"],
                     embed_dim=shape["embed"], branches=("slow", "fast"), slow_kernel=7, layernorm=True)
    head = head.to(torch.float16)
    with record_launcher_calls() as calls, capture_launches():
        for rois in shape["K"]:
            x = torch.randn(rois, shape["C"], shape["T"], 7, 7, dtype=torch.float16, requires_grad=True)
            y = x
            for block in head.blocks:
                y = block(y)
            y.float().sum().backward()
    if not calls:
        raise RuntimeError("no Triton launcher ran: under TRITON_INTERPRET=1 the ops did not dispatch to Triton")
    return encode_calls(calls)


def count(calls: list[dict], archs: list[int], dtype16) -> dict:
    from stssa_kernels.compile_check import count_variants, replay_calls

    return {f"sm_{cc}": count_variants(replay_calls(calls, cc, dtype16), cc) for cc in archs}


def specialise_everything() -> None:
    """Drop every ``do_not_specialize`` / ``do_not_specialize_on_alignment`` of the Triton kernels (the
    JIT's default: every integer argument specialised on == 1 and % 16), for comparison."""
    from stssa_kernels.compile_check import TRITON_MODULES
    import importlib
    from triton.runtime.jit import JITFunction

    for name in TRITON_MODULES:
        for obj in vars(importlib.import_module(name)).values():
            if isinstance(obj, JITFunction):
                for kp in obj.params:
                    kp.do_not_specialize = kp.do_not_specialize_on_alignment = False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", default=None, help="sm_80, sm_86, sm_90 (default all three)")
    ap.add_argument("--shape", default="ava", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="16-bit dtype of the run (AVA: bf16 autocast)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--record", default=None, help=argparse.SUPPRESS)  # internal: the interpreter process
    args = ap.parse_args(argv)
    if args.record:
        with open(args.record, "w") as f:
            json.dump(record(SHAPES[args.shape]), f)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "calls.json")
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, os.path.abspath(__file__), "--record", path, "--shape", args.shape],
                       env=env, check=True)
        with open(path) as f:
            calls = json.load(f)
    import torch

    archs = [int(a.replace("sm_", "")) for a in (args.arch or ["sm_80", "sm_86", "sm_90"])]
    dtype16 = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    result = {"shape": dict(SHAPES[args.shape], name=args.shape), "dtype": args.dtype,
              "launcher_calls": len(calls), "per_arch": count(calls, archs, dtype16)}
    specialise_everything()
    result["per_arch_without_do_not_specialize"] = count(calls, archs, dtype16)
    for arch, r in result["per_arch_without_do_not_specialize"].items():
        print(f"{arch} without do_not_specialize: {r['variants']} variants")
    for arch, r in result["per_arch"].items():
        kernels = ", ".join(f"{k} {v[1]}" for k, v in sorted(r["per_kernel"].items()))
        print(f"{arch}: {r['variants']} kernel variants compiled ({r['launches']} launches) -- {kernels}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
