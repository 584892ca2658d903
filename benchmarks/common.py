"""Shared benchmark plumbing: timing (warm-up, repeats, median, device sync), device description,
roofline peaks, and result files under benchmarks/results/ (JSON named by op, device and date).

Every benchmark script imports this module; CPU numbers are labelled CPU with the thread count.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable

import torch

#: Where the results JSON go (STSSA_BENCH_RESULTS overrides it: tests, scratch runs).
RESULTS = os.environ.get("STSSA_BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Peak DRAM bandwidth (GB/s) and dense fp16/bf16 tensor-core throughput (TFLOP/s), by GPU name substring.
# Datasheet numbers (dense, no sparsity); the first matching entry wins.
GPU_PEAKS = [
    ("H200", 4800.0, 989.0),
    ("H100 PCIe", 2000.0, 756.0),
    ("H100", 3350.0, 989.0),
    ("A100-SXM4-80GB", 2039.0, 312.0),
    ("A100", 1555.0, 312.0),
    ("A10G", 600.0, 125.0),
    ("L4", 300.0, 121.0),
    ("RTX 4090", 1008.0, 165.0),
    ("RTX 3090", 936.0, 71.0),
    ("TITAN RTX", 672.0, 130.0),
    ("RTX Titan", 672.0, 130.0),
    ("V100", 900.0, 125.0),
    ("T4", 320.0, 65.0),
]


def device_info(device: torch.device) -> dict:
    info = {"device_type": device.type, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                    memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
        for key, bw, tflops in GPU_PEAKS:
            if key.lower() in p.name.lower():
                info.update(peak_gbps=bw, peak_tflops_fp16=tflops)
                break
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"model name\s*:\s*(.+)", f.read())
                name = m.group(1).strip() if m else name
        except OSError:
            pass
        info.update(name=f"CPU: {name}", threads=torch.get_num_threads())
    return info


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one ``fn()`` call: CUDA events on GPU (waits for the kernels), wall clock on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 20,
            min_time: float = 0.0) -> dict:
    """Median wall time of ``fn()`` in ms with the device synchronised around every call.

    ``min_time`` (s) keeps repeating past ``repeats`` until that much time was measured, for short kernels.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    total = 0.0
    while len(times) < repeats or total < min_time:
        dt = timed_call(fn, device)
        times.append(dt)
        total += dt / 1e3
        if len(times) >= 10 * repeats:
            break
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": len(times)}


def interleaved(fns: dict, device, warmup: int, repeats: int) -> dict:
    """Median ms of each fn, timing the methods in rounds (one call of each per round) so that a
    drift in machine load (shared CPU) hits every method alike, in a fresh (seeded) order each round so
    that no method always follows the same one: a call that frees large temporaries makes the next
    call's first touch of fresh memory cost page faults (on this project's VM about half a millisecond
    per MB touched), and a fixed order would charge them to one method. Device synchronised around calls."""
    import random

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            times[k].append(timed_call(fns[k], device))
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "repeats": len(v)} for k, v in times.items()}


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated on the GPU during one call, above what was allocated before it."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def write_results(op: str, device: torch.device, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    info = device_info(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info["name"]).strip("-").lower()[:40]
    date = datetime.date.today().isoformat()
    path = os.path.join(RESULTS, f"{op}_{slug}_{date}.json")
    doc = {"op": op, "date": date, "commit": git_commit(), "device": info, **payload}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """columns: (key, header). Floats get 3 significant decimals."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)
    table = [[h for _, h in columns]] + [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for i, row in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
