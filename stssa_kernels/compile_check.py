"""Ahead-of-time compile check of every GPU kernel, without a GPU.

    python -m stssa_kernels.compile_check [--arch sm_90 ...] [--json OUT] [--dots] [--list]

Two parts:

* Triton: every kernel variant the JIT compiles for the calls of each Triton op module's
  ``compile_workloads`` (each module exposes ``compile_specs(cc) -> list[KernelSpec]``): the launchers
  run on CPU tensors in the layouts the ops are given (contiguous, channels-last, temporal_proj's
  channel slices, and an odd-strided worst case) with their launches recorded, and each distinct
  launch is built the way the JIT would build it on that arch -- the same binder, so the same
  divisibility / unit-stride / alignment specialisations and ``do_not_specialize`` -- with
  ``triton.compile(ASTSource, GPUTarget)``. Registers, spill (local/stack) bytes and shared memory
  are read from the cubin with the ``cuobjdump`` that ships with Triton; every ``tl.dot`` is reported
  as lowered in the TTGIR: wgmma (HGMMA), mma.sync (HMMA) or FMA.
* CUDA C++: the kernels compiled into ``stssa_kernels._C`` (when built with CUDA) are read from the
  extension's fatbinary, per arch.

Exit status is non-zero on a compile failure, a register spill, or shared memory over the arch's
per-block limit.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable

# Modules with Triton kernels; each defines compile_specs(cc: int) -> list[KernelSpec].
TRITON_MODULES = [
    "stssa_kernels.triton.attention3d",
    "stssa_kernels.triton.temporal_proj",
]

# Max dynamic shared memory per block (opt-in), bytes.
SMEM_LIMIT = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


@dataclasses.dataclass
class KernelSpec:
    """One compiled variant of a Triton kernel, as the JIT would build it for one arch.

    ``signature``, ``constexprs``, ``attrs`` and ``options`` are what ``triton.compile`` receives
    (``ASTSource(fn, signature, constexprs, attrs)``); ``spec_from_launch`` derives them from a
    recorded launch with the JIT's own binder. ``key`` identifies the variant (the JIT's cache key
    without the source hash); ``layouts`` names the input layouts whose launches compile to it.
    """
    name: str
    config: str
    module: str
    fn_name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    layouts: str = ""
    key: Any = None

    @property
    def fn(self):
        return getattr(importlib.import_module(self.module), self.fn_name)

    @property
    def num_warps(self) -> int:
        return self.options.get("num_warps", 4)

    @property
    def num_stages(self) -> int:
        return self.options.get("num_stages", 3)


def spec_from_launch(launch, cc: int, config: str, layout: str = "") -> KernelSpec:
    """The variant the JIT compiles for a recorded launch (``stssa_kernels.triton._launch.Launch``) on
    an sm_``cc`` device."""
    from .triton._launch import jit_compile_args

    kernel = launch.kernel
    signature, constexprs, attrs, options, key = jit_compile_args(kernel, launch.args, launch.kwargs, cc)
    return KernelSpec(name=kernel.fn.__name__.lstrip("_").removesuffix("_kernel"), config=config, module=kernel.fn.__module__,
                      fn_name=kernel.fn.__name__, signature=signature, constexprs=constexprs, attrs=attrs,
                      options=dict(options.__dict__), layouts=layout, key=key)


def specs_from_launches(recorded, cc: int) -> list[KernelSpec]:
    """``recorded``: [(Launch, config label, layout name)] -> one KernelSpec per distinct variant, in
    first-seen order, each naming every layout that compiles to it."""
    specs: dict = {}
    for launch, config, layout in recorded:
        spec = spec_from_launch(launch, cc, config, layout)
        if spec.key in specs:
            have = specs[spec.key]
            if layout not in have.layouts.split(","):
                have.layouts += "," + layout
        else:
            specs[spec.key] = spec
    return list(specs.values())


# ---- recorded launcher calls: record anywhere (e.g. under the interpreter), replay for an arch ----------

_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "int32": "int32", "int64": "int64"}


def _encode(a):
    import torch
    if isinstance(a, torch.Tensor):
        return {"tensor": list(a.shape), "stride": list(a.stride()), "offset": a.storage_offset(),
                "dtype": str(a.dtype).replace("torch.", "")}
    if isinstance(a, (list, tuple)):
        return [_encode(x) for x in a]
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    return {"opaque": type(a).__name__}  # plans / tile configs: recomputed for the target arch


def encode_calls(calls) -> list[dict]:
    """JSON-able form of ``record_launcher_calls()`` entries: tensors become (shape, strides, storage
    offset, dtype), which is all a launch's specialisation depends on."""
    return [{"module": m, "launcher": n, "args": [_encode(a) for a in args],
             "kwargs": {k: _encode(v) for k, v in kwargs.items()}} for m, n, args, kwargs in calls]


def _decode(a, dtype16):
    import torch
    if isinstance(a, dict) and "tensor" in a:
        dt = getattr(torch, a["dtype"])
        if dtype16 is not None and dt in (torch.float16, torch.bfloat16):
            dt = dtype16
        shape, stride = a["tensor"], a["stride"]
        extent = a["offset"] + sum((n - 1) * st for n, st in zip(shape, stride)) + 1 if all(shape) else a["offset"] + 1
        return torch.empty(extent, dtype=dt).as_strided(shape, stride, a["offset"])
    if isinstance(a, list):
        return [_decode(x, dtype16) for x in a]
    if isinstance(a, dict):
        return None  # opaque: replaced by retarget
    return a


def replay_calls(calls: list[dict], cc: int, dtype16=None) -> list:
    """Run recorded launcher calls again on CPU for arch ``cc`` (plans / tile configs re-picked by each
    module's ``retarget``; 16-bit tensors recreated as ``dtype16`` when given) with the launches
    recorded, not run: [Launch]."""
    from .triton._launch import capture_launches

    launches = []
    for c in calls:
        mod = importlib.import_module(c["module"])
        args = tuple(_decode(a, dtype16) for a in c["args"])
        kwargs = {k: _decode(v, dtype16) for k, v in c["kwargs"].items()}
        args, kwargs = mod.retarget(c["launcher"], args, kwargs, cc)
        with capture_launches() as got:
            getattr(mod, c["launcher"])(*args, **kwargs)
        launches += got
    return launches


def count_variants(launches, cc: int) -> dict:
    """Distinct compiled variants among ``launches`` on arch ``cc``, as the JIT would count them:
    {"launches": n, "variants": n, "per_kernel": {name: [launches, variants]}}."""
    from .triton._launch import jit_compile_args

    seen, per = set(), {}
    for ln in launches:
        key = jit_compile_args(ln.kernel, ln.args, ln.kwargs, cc)[-1]
        n = per.setdefault(ln.name.lstrip("_").removesuffix("_kernel"), [0, 0])
        n[0] += 1
        if key not in seen:
            seen.add(key)
            n[1] += 1
    return {"launches": len(launches), "variants": len(seen), "per_kernel": per}


@dataclasses.dataclass
class Row:
    kind: str
    kernel: str
    config: str
    arch: str
    regs: int | None = None
    spill: int | None = None
    smem: int | None = None
    mma: str = ""
    status: str = "ok"
    layouts: str = ""
    dots: str = ""  # per tl.dot (source line): what it lowered to, e.g. "L212:wgmma L230:mma.sync"


def _cuobjdump() -> str | None:
    try:
        import triton
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    return shutil.which("cuobjdump")


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _resource_usage(path: str, tool: str) -> list[tuple[str, str, int, int, int]]:
    """[(arch, function, regs, stack+local bytes, static shared bytes)] from cuobjdump."""
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    rows, arch, fn = [], "", ""
    for line in out.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
        m = _RES_RE.search(line)
        if m and fn:
            regs, stack, shared, local = map(int, m.groups())
            rows.append((arch, fn, regs, stack + local, shared))
    return rows


_DOT_RE = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*-> tensor<[^,>]*, #(\w+)>.*loc\((#loc\d*)\)")
_LOC_DEF_RE = re.compile(r"^(#loc\d*) = loc\((.*)\)$")


def _source_line(alias: str, defs: dict) -> str:
    """Source line of a TTGIR location alias; for an inlined helper, the line inside the helper."""
    for _ in range(64):  # aliases chain (name -> callsite -> file); bounded in case of a cycle
        text = defs.get(alias, "")
        m = re.match(r'"[^"]*":(\d+):\d+', text)
        if m:
            return m.group(1)
        m = re.match(r"callsite\((#loc\d*) at", text) or re.match(r'"[^"]*"\((#loc\d*)\)', text)
        if not m:
            return "?"
        alias = m.group(1)
    return "?"


def dot_lowering(ttgir: str) -> list[tuple[str, str]]:
    """[(source line, kind)] for every tl.dot of a compiled kernel, kind "wgmma" (sm_90 warpgroup MMA,
    HGMMA in SASS), "mma.sync" (HMMA: sm_80-style MMA, also what an sm_90 dot whose tile cannot
    feed wgmma falls back to) or "fma" (no matrix unit, FFMA)."""
    defs, encodings = {}, {}
    for line in ttgir.splitlines():
        m = _LOC_DEF_RE.match(line)
        if m:
            defs[m.group(1)] = m.group(2)
        m = re.match(r"^#(\w+) = #ttg\.(\w+)<", line)
        if m:
            encodings[m.group(1)] = m.group(2)
    dots = []
    for line in ttgir.splitlines():
        m = _DOT_RE.search(line)
        if not m:
            continue
        op, enc, loc = m.groups()
        if op == "ttng.warp_group_dot":
            kind = "wgmma"
        else:
            kind = "mma.sync" if encodings.get(enc) == "nvidia_mma" else "fma"
        dots.append((_source_line(loc, defs), kind))
    return dots


def _mma_summary(dots: list[tuple[str, str]]) -> str:
    n = len(dots)
    counts = {k: sum(1 for _, d in dots if d == k) for k in ("wgmma", "mma.sync", "fma")}
    return " ".join(f"{k} {c}/{n}" for k, c in counts.items() if c) or "-"


def _compile_one(spec: KernelSpec, cc: int, tool: str | None) -> Row:
    """Compile one spec for sm_``cc`` and read its resources (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row("triton", spec.name, spec.config, f"sm_{cc}", layouts=spec.layouts)
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=spec.options)
        row.smem = int(k.metadata.shared)
        dots = dot_lowering(k.asm["ttgir"])
        row.mma = _mma_summary(dots)
        row.dots = " ".join(f"L{line}:{kind}" for line, kind in dots)
        if tool:
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                usage = _resource_usage(f.name, tool)
                if usage:
                    _, _, row.regs, row.spill, _ = usage[0]
        if row.spill:
            row.status = "SPILL"
        if row.smem > SMEM_LIMIT.get(cc, 49152):
            row.status = f"SMEM>{SMEM_LIMIT.get(cc, 49152)}"
    except Exception as e:  # a compile failure is a reported result, not a crash
        row.status = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return row


def triton_specs(archs: list[int]) -> list[tuple[int, KernelSpec]]:
    """[(cc, spec)] of every Triton module's ``compile_specs(cc)``, in module and arch order."""
    out = []
    for modname in TRITON_MODULES:
        mod = importlib.import_module(modname)
        for cc in archs:
            out += [(cc, spec) for spec in mod.compile_specs(cc)]
    return out


def check_triton(archs: list[int], tool: str | None, jobs: int = 2) -> list[Row]:
    """Compile every spec; independent compiles run in ``jobs`` processes (each compile is single-threaded)."""
    tasks = triton_specs(archs)
    if jobs <= 1 or len(tasks) <= 1:
        return [_compile_one(spec, cc, tool) for cc, spec in tasks]
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs,
                                                mp_context=multiprocessing.get_context("spawn")) as ex:
        return list(ex.map(_compile_one, [s for _, s in tasks], [cc for cc, _ in tasks],
                           [tool] * len(tasks), chunksize=4))


def check_cuda_extension(archs: list[int], tool: str | None) -> list[Row]:
    try:
        from . import _C
    except ImportError:
        return []
    import torch  # noqa: F401
    info = torch.ops.stssa._build_info()
    if "cuda=1" not in info:
        return [Row("cuda", "(extension built without CUDA)", info, "-", status="skipped")]
    if tool is None:
        return [Row("cuda", "(no cuobjdump found)", "", "-", status="skipped")]
    rows = []
    wanted = {f"sm_{cc}" for cc in archs}
    try:
        usage = _resource_usage(_C.__file__, tool)
    except subprocess.CalledProcessError as e:  # reported, not a crash: the Triton rows still print
        return [Row("cuda", "(cuobjdump cannot read _C)", (e.stderr or "").strip()[:80], "-", status="FAIL: cuobjdump")]
    for arch, fn, regs, spill, smem in usage:
        if arch not in wanted:
            continue
        name = _demangle(fn)
        rows.append(Row("cuda", name, "", arch, regs, spill, smem, status="SPILL" if spill else "ok"))
    missing = wanted - {r.arch for r in rows}
    for arch in sorted(missing):
        rows.append(Row("cuda", "(no code for this arch in _C)", "", arch, status="ok (not built)"))
    return rows


def _demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt:
        name = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name
    return name if len(name) < 90 else name[:87] + "..."


def _print(rows: list[Row], dots: bool = False) -> None:
    hdr = ("kind", "kernel", "config", "layouts", "arch", "regs", "spill", "smem", "mma", "status")
    fmt = lambda v: str(v if v is not None else "-")  # noqa: E731
    table = [hdr] + [(r.kind, r.kernel, r.config, r.layouts or "-", r.arch, fmt(r.regs), fmt(r.spill), fmt(r.smem),
                      r.mma + (f" [{r.dots}]" if dots and r.dots else ""), r.status) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(hdr))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


DEFAULT_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", default=None,
                    help=f"sm_75, sm_80, sm_86, sm_90 ... (repeatable; default {' '.join(DEFAULT_ARCHS)})")
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    ap.add_argument("--no-cuda-ext", action="store_true", help="skip the compiled CUDA C++ kernels")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    ap.add_argument("--dots", action="store_true", help="print the lowering of every tl.dot (source line: kind)")
    ap.add_argument("--list", action="store_true", help="list the variants per arch without compiling")
    ap.add_argument("--spills-are-warnings", action="store_true",
                    help="report spills but fail only on build errors (an older Triton whose tiles are not tuned "
                         "yet: its API is checked, its register allocation is reported)")
    args = ap.parse_args(argv)
    archs = [int(a.replace("sm_", "")) for a in (args.arch or DEFAULT_ARCHS)]
    if args.list:
        specs = triton_specs(archs)
        for cc, sp in specs:
            print(f"sm_{cc}  {sp.name:20s} {sp.config:40s} {sp.layouts}")
        print(f"\n{len(specs)} Triton kernel variants")
        return 0
    tool = _cuobjdump()
    rows = check_triton(archs, tool, args.jobs)
    if not args.no_cuda_ext:
        rows += check_cuda_extension(archs, tool)
    _print(rows, args.dots)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    bad = [r for r in rows if not r.status.startswith("ok") and r.status != "skipped"]
    if args.spills_are_warnings:
        spills = [r for r in bad if r.status == "SPILL"]
        bad = [r for r in bad if r.status != "SPILL"]
        print(f"\n{len(spills)} builds spill (reported only: --spills-are-warnings)")
    print(f"\n{len(rows)} kernel builds checked, {len(bad)} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
