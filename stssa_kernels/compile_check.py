"""Ahead-of-time compile check of every GPU kernel, without a GPU.

    python -m stssa_kernels.compile_check [--arch sm_75 --arch sm_80 --arch sm_90] [--json OUT]

Two parts:

* Triton: every kernel configuration the dispatchers can pick (each Triton op module exposes
  ``compile_specs(cc) -> list[KernelSpec]``) is compiled with ``triton.compile(ASTSource, GPUTarget)``
  for each arch; registers, spill (local/stack) bytes and shared memory are read from the cubin with
  the ``cuobjdump`` that ships with Triton, and the SASS is scanned for the matrix instructions
  (HMMA/HGMMA) vs FFMA so the sm_75 FFMA lowering is visible.
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
    """One compilable configuration of a Triton kernel.

    ``signature`` maps every argument name of ``fn`` to a Triton type string ("*fp16", "*fp32", "i32",
    "i64", "fp32", ...) or "constexpr"; ``constexprs`` gives the value of each constexpr argument.
    """
    name: str
    config: str
    fn: Any
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    # {arg name: 16} for arguments the runtime specialisation sees as 16-divisible (ints) or 16-byte
    # aligned (pointers), as Triton's JIT does at launch; without it the AOT build gets no
    # vectorisation hints and compiles a different (scalar-load) kernel than the one that runs.
    attrs: dict = dataclasses.field(default_factory=dict)


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


def _mma_kind(cubin_path: str, tool: str) -> str:
    sass = subprocess.run([tool, "-sass", cubin_path], capture_output=True, text=True).stdout
    for op in ("HGMMA", "HMMA", "IMMA"):
        if op in sass:
            return op
    return "FFMA" if "FFMA" in sass else "-"


def _compile_one(modname: str, cc: int, index: int, tool: str | None) -> Row:
    """Compile spec ``index`` of ``compile_specs(cc)`` of ``modname`` (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.import_module(modname).compile_specs(cc)[index]
    row = Row("triton", spec.name, spec.config, f"sm_{cc}")
    try:
        attrs = {(spec.fn.arg_names.index(a),): [["tt.divisibility", d]] for a, d in spec.attrs.items()}
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        row.smem = int(k.metadata.shared)
        if tool:
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                usage = _resource_usage(f.name, tool)
                if usage:
                    _, _, row.regs, row.spill, _ = usage[0]
                row.mma = _mma_kind(f.name, tool)
        if row.spill:
            row.status = "SPILL"
        if row.smem > SMEM_LIMIT.get(cc, 49152):
            row.status = f"SMEM>{SMEM_LIMIT.get(cc, 49152)}"
    except Exception as e:  # a compile failure is a reported result, not a crash
        row.status = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return row


def check_triton(archs: list[int], tool: str | None, jobs: int = 1) -> list[Row]:
    """Compile every spec; independent compiles run in ``jobs`` processes (each compile is single-threaded)."""
    tasks = []
    for modname in TRITON_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue  # op not implemented yet
            raise
        for cc in archs:
            tasks += [(modname, cc, i, tool) for i in range(len(mod.compile_specs(cc)))]
    if jobs <= 1 or len(tasks) <= 1:
        return [_compile_one(*t) for t in tasks]
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs,
                                                mp_context=multiprocessing.get_context("spawn")) as ex:
        return list(ex.map(_compile_one, *zip(*tasks)))


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
    for arch, fn, regs, spill, smem in _resource_usage(_C.__file__, tool):
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


def _print(rows: list[Row]) -> None:
    hdr = ("kind", "kernel", "config", "arch", "regs", "spill", "smem", "mma", "status")
    table = [hdr] + [(r.kind, r.kernel, r.config, r.arch, str(r.regs if r.regs is not None else "-"),
                      str(r.spill if r.spill is not None else "-"), str(r.smem if r.smem is not None else "-"),
                      r.mma, r.status) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(hdr))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", default=None, help="sm_75, sm_80, sm_90 ... (repeatable)")
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    ap.add_argument("--no-cuda-ext", action="store_true", help="skip the compiled CUDA C++ kernels")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = ap.parse_args(argv)
    archs = [int(a.replace("sm_", "")) for a in (args.arch or ["sm_75", "sm_80", "sm_90"])]
    tool = _cuobjdump()
    rows = check_triton(archs, tool, args.jobs)
    if not args.no_cuda_ext:
        rows += check_cuda_extension(archs, tool)
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    bad = [r for r in rows if not r.status.startswith("ok") and r.status != "skipped"]
    print(f"\n{len(rows)} kernel builds checked, {len(bad)} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
