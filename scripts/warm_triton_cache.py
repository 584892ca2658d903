#!/usr/bin/env python3
"""Fill Triton's cache for one GPU arch before the GPU tests and benchmarks run.

    python scripts/warm_triton_cache.py --cc 90 [--jobs N] [--sources specs,bench,head] [--list] [--json OUT]

Each configuration is compiled exactly as the JIT would compile it at its first launch (the same binder,
hence the same signature, specialisations and options, and the same ``triton.compile`` call), so the
JIT's cache lookup at run time finds it: a process pool does in parallel what the tests would otherwise
do one kernel at a time. Sources of configurations:

* ``specs``: every variant ``compile_check`` builds (each Triton module's ``compile_specs``: each tile of
  each kernel and dtype in the layouts the ops see). Needs no compiled extension, so it can run while
  the extension builds.
* ``bench``: the launches of ``benchmarks/attn3d.py`` (its GPU shapes, every axis, fp16/bf16,
  contiguous, with residual and gamma) and ``benchmarks/temporal_proj.py`` (its GPU projection sets).
* ``head``: the launches of one STSSA head forward + backward at ``benchmarks/head.py``'s AVA shape
  (``scripts/head_variants.py`` records them under the interpreter).

Launch shapes of individual GPU tests beyond these are compiled by the JIT when they first run.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernels_without_extension() -> None:
    """Make ``stssa_kernels.triton.*`` and ``stssa_kernels.compile_check`` importable without running the
    package ``__init__`` (which loads the compiled extension, possibly still being built). The kernel
    functions, and so the JIT's cache keys, are the same as under a normal import."""
    if "stssa_kernels" in sys.modules:
        return
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    pkg = types.ModuleType("stssa_kernels")
    pkg.__path__ = [os.path.join(ROOT, "stssa_kernels")]
    sys.modules["stssa_kernels"] = pkg


def spec_configurations(cc: int) -> list:
    kernels_without_extension()
    from stssa_kernels.compile_check import triton_specs
    return [spec for _, spec in triton_specs([cc])]


def bench_configurations(cc: int) -> list:
    """The Triton launches of the attention and temporal_proj GPU benchmarks (their shape tables)."""
    kernels_without_extension()
    import torch

    from stssa_kernels.compile_check import specs_from_launches
    from stssa_kernels.triton import attention3d as TK
    from stssa_kernels.triton import temporal_proj as TP

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    shapes_a = _module_constant(os.path.join(ROOT, "benchmarks", "attn3d.py"), "GPU_SHAPES")
    shapes_t = _module_constant(os.path.join(ROOT, "benchmarks", "temporal_proj.py"), "GPU_SHAPES")
    kt = _module_constant(os.path.join(ROOT, "benchmarks", "temporal_proj.py"), "KT")
    recorded = []
    for dtype in (torch.float16, torch.bfloat16):
        for s in shapes_a.values():
            for axis in ("spatial", "temporal", "full"):
                _, L = TK.seq_count_and_length((s["B"], s["dk"], s["T"], s["H"], s["W"]), axis)
                if TK.plan(cc, L, s["dk"], s["dv"], dtype) is None:
                    continue
                calls = TK.record_call(cc, "contiguous", dtype, (s["B"], s["dk"], s["T"], s["H"], s["W"]), s["dv"], axis)
                recorded += [(ln, label, "bench-attn3d") for ln, label in calls]
        if TP.configs_for_arch(cc):
            for s in shapes_t.values():
                for bias in (False, True):
                    calls = TP.record_call(cc, dtype, s["C"], s["out"], kt, bias)
                    recorded += [(ln, label, "bench-temporal_proj") for ln, label in calls]
    return specs_from_launches(recorded, cc)


def _module_constant(path: str, name: str):
    """A module-level constant of a benchmark script, evaluated without importing the script (its
    imports need the compiled extension): the assignment is executed on its own."""
    import ast

    tree = ast.parse(open(path).read(), path)
    for node in tree.body:
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if name in targets:
            env: dict = {}
            for helper in tree.body:  # the small functions a table may call (e.g. stssa_out)
                if isinstance(helper, ast.FunctionDef):
                    exec(compile(ast.Module([helper], []), path, "exec"), env)
            exec(compile(ast.Module([node], []), path, "exec"), env)
            return env[name]
    raise KeyError(f"{path} defines no {name}")


def head_configurations(cc: int) -> list:
    """The launches of one STSSA head forward + backward at the AVA shape (needs the extension)."""
    import subprocess
    import tempfile

    sys.path.insert(0, ROOT)
    from stssa_kernels.compile_check import replay_calls, specs_from_launches

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "calls.json")
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "head_variants.py"), "--record", path],
                       env=env, check=True)
        calls = json.load(open(path))
    import torch
    recorded = []
    for dtype in (torch.bfloat16, torch.float16):
        recorded += [(ln, ln.name, "head") for ln in replay_calls(calls, cc, dtype)]
    return specs_from_launches(recorded, cc)


SOURCES = {"specs": spec_configurations, "bench": bench_configurations, "head": head_configurations}


def configurations(cc: int, sources: list[str]) -> tuple[list, dict]:
    """(distinct specs over the sources, {source: count or error}); duplicates across sources compile once."""
    seen, out, report = set(), [], {}
    for name in sources:
        try:
            specs = SOURCES[name](cc)
        except Exception as e:  # a source that cannot be enumerated is reported, the others still warm
            report[name] = f"ERROR {type(e).__name__}: {e}"
            continue
        new = [s for s in specs if s.key not in seen]
        seen.update(s.key for s in new)
        out += new
        report[name] = f"{len(specs)} configurations, {len(new)} new"
    return out, report


def _compile(spec, cc: int) -> tuple[str, str, float, str]:
    kernels_without_extension()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs),
                       target=GPUTarget("cuda", cc, 32), options=spec.options)
        status = "ok"
    except Exception as e:
        status = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return spec.name, spec.config, time.perf_counter() - t0, status


def warm(specs: list, cc: int, jobs: int) -> list[tuple]:
    if jobs <= 1:
        return [_compile(s, cc) for s in specs]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                                initializer=kernels_without_extension) as ex:
        return list(ex.map(_compile, specs, [cc] * len(specs)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", type=int, default=None, help="compute capability, e.g. 90 (default: this GPU's)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sources", default="specs,bench,head")
    ap.add_argument("--list", action="store_true", help="print the configurations, compile nothing")
    ap.add_argument("--json", default=None, help="write what was compiled (and how long each took) here")
    args = ap.parse_args(argv)
    if args.cc is None:
        import torch
        major, minor = torch.cuda.get_device_capability()
        args.cc = major * 10 + minor
    t0 = time.perf_counter()
    specs, report = configurations(args.cc, args.sources.split(","))
    for name, r in report.items():
        print(f"source {name}: {r}")
    if args.list:
        for s in specs:
            print(f"{s.name:22s} {s.config:44s} {s.layouts}")
        print(f"{len(specs)} configurations for sm_{args.cc}")
        return 0
    t1 = time.perf_counter()
    results = warm(specs, args.cc, args.jobs)
    bad = [r for r in results if r[3] != "ok"]
    print(f"warmed {len(results) - len(bad)}/{len(results)} configurations for sm_{args.cc} with {args.jobs} "
          f"processes in {time.perf_counter() - t1:.0f} s (enumeration {t1 - t0:.0f} s; "
          f"compile time summed {sum(r[2] for r in results):.0f} s)")
    for r in bad:
        print("  ", *r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cc": args.cc, "sources": report, "results": results}, f, indent=1)
    return 1 if bad or any(v.startswith("ERROR") for v in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
