"""Benchmark: stssa_kernels.attention3d vs the PyTorch ways of writing the same attention.

    python benchmarks/attn3d.py [--device cuda|cpu] [--dtype fp16|bf16|fp32] [--threads N]
                                [--shapes NAME ...] [--axes spatial temporal full] [--repeats N]

Every case is the SAGAN/STSSA block's attention, ``residual + gamma * softmax(q^T k / sqrt(dk)) v`` on
contiguous ``[B, D, T, H, W]`` maps (what a Conv3d produces), along one axis. Methods, side by side on
one device in one run, forward ("fwd") and forward+backward ("fwd+bwd": grads of q, k, v, residual,
gamma):

  composition   the paper-style composition: permute/reshape, bmm, softmax, bmm, permute back
                (``attention3d_ref``, also the model's use_fused=False path)
  sdpa[<b>]     ``F.scaled_dot_product_attention`` on the permuted (and copied, for the fused backends'
                unit-stride head dim) q/k/v, for each SDPA backend <b> available on the device
                (``torch.nn.attention.sdpa_kernel``; a backend that rejects the case is listed as skipped)
  attention3d   the op as dispatched; the dispatch-table entry that ran is printed and saved

Reported per method: median time (interleaved rounds, warm-up first, device synchronised), achieved
GB/s and TFLOP/s, the fraction of the roofline (max of bytes/bandwidth and flops/peak: datasheet peaks
for known GPUs, measured copy bandwidth and matmul throughput on CPU), peak memory above the inputs
(CUDA only) and attention3d's speed-up over the best baseline. Bytes are the traffic floor (read q, k,
v, residual, write out; the backward reads q, k, v, dY and writes dq, dk, dv); flops count the useful
matrix products only (fwd 2 L^2 (dk + dv), bwd 2 L^2 (3 dk + 2 dv) per sequence and head), not the
softmax, recomputation or the packing waste of the kernels.

Shapes. GPU (the issue's): AVA RoI head K=32 RoIs, T=8/16, 7x7, Dk=64/256, Dv=512/2048, and the
backbone map B=8, T=16, 16x16, Dk=Dv=256, each along all three axes. CPU-only machines run reduced
shapes of the same structure on the CPU path and say so; CPU numbers say nothing about GPU speed.

Writes benchmarks/results/attn3d_<device>_<date>.json (device, date, git commit, versions, dispatch
entries, every number) and a PNG plot next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, interleaved, peak_memory, print_table, write_results  # noqa: E402

import stssa_kernels  # noqa: E402,F401
from stssa_kernels import attention3d  # noqa: E402
from stssa_kernels.ops import attention3d as attn_ops  # noqa: E402
from stssa_kernels.reference import attention3d_ref, attention3d_sdpa  # noqa: E402
from stssa_kernels.reference.attention3d import seq_count_and_length  # noqa: E402

AXES = ("spatial", "temporal", "full")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

GPU_SHAPES = {
    **{f"ava_t{T}_dk{dk}_dv{dv}": dict(B=32, T=T, H=7, W=7, dk=dk, dv=dv)
       for T in (8, 16) for dk in (64, 256) for dv in (512, 2048)},
    "backbone_t16_16x16": dict(B=8, T=16, H=16, W=16, dk=256, dv=256),
}
# Same structure at sizes a 2-core CPU finishes in seconds: the AVA head's Dk = Dv/8 and Dk = Dv/4 at
# fewer RoIs and channels, the backbone map at 8 frames; plus one small case where per-call overhead shows.
CPU_SHAPES = {
    "cpu_ava_t8_dk64_dv512": dict(B=8, T=8, H=7, W=7, dk=64, dv=512),
    "cpu_ava_t16_dk64_dv256": dict(B=8, T=16, H=7, W=7, dk=64, dv=256),
    "cpu_backbone_t8_16x16": dict(B=2, T=8, H=16, W=16, dk=64, dv=64),
    "cpu_small_t8_8x8": dict(B=2, T=8, H=8, W=8, dk=64, dv=64),
    # issue #11 item 8: AVA-like RoI shapes (K=8 RoIs) and a small map, on the axis the head uses there
    "cpu_roi_k8_t8_dk64_dv256": dict(B=8, T=8, H=7, W=7, dk=64, dv=256, axes=("spatial",)),
    "cpu_roi_k8_t16_dk64_dv256": dict(B=8, T=16, H=7, W=7, dk=64, dv=256, axes=("temporal",)),
    "cpu_map_b2_t4_16x16_dk32_dv128": dict(B=2, T=4, H=16, W=16, dk=32, dv=128, axes=("spatial",)),
}
#: per-call overhead at a tiny size, 1 thread (issue #11 item 1: forward within 2x of the composition,
#: forward+backward at parity or better)
TINY = dict(B=1, T=2, H=4, W=4, dk=8, dv=8)
TINY_TARGET = {"fwd": 2.0, "fwd+bwd": 1.0}  # max ratio attention3d / composition


def _sdpa_backends(device):
    """(name, SDPBackend) pairs to try on this device."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # torch < 2.3
        return []
    names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"] if device.type == "cuda" \
        else ["FLASH_ATTENTION", "MATH"]
    return [(n.lower().replace("_attention", ""), getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def _sdpa_ctx(backend):
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel([backend])


def make_inputs(s, dtype, device, requires_grad, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, T, H, W, dk, dv = s["B"], s["T"], s["H"], s["W"], s["dk"], s["dv"]

    def rnd(c):
        return torch.randn(B, c, T, H, W, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    q, k, v, r = rnd(dk), rnd(dk), rnd(dv), rnd(dv)
    gamma = torch.tensor(0.5, device=device).requires_grad_(requires_grad)
    return q, k, v, r, gamma


def traffic_and_flops(s, axis, dtype, mode):
    el = torch.tensor([], dtype=dtype).element_size()
    B, T, H, W, dk, dv = s["B"], s["T"], s["H"], s["W"], s["dk"], s["dv"]
    pos = B * T * H * W
    nseq, L = seq_count_and_length((B, dk, T, H, W), axis)
    fwd_bytes = el * pos * (2 * dk + 3 * dv)
    fwd_flops = 2 * nseq * L * L * (dk + dv)
    if mode == "fwd":
        return fwd_bytes, fwd_flops
    return fwd_bytes + el * pos * (4 * dk + 3 * dv), fwd_flops + 2 * nseq * L * L * (3 * dk + 2 * dv)


def cpu_peaks(device):
    """Measured on this machine (not a datasheet): streaming copy bandwidth and fp32 matmul throughput."""
    a = torch.empty(64 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        t.append(time.perf_counter() - t0)
    bw = 2 * a.numel() / min(t) / 1e9
    m = torch.randn(1024, 1024)
    torch.mm(m, m)
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(m, m)
        t.append(time.perf_counter() - t0)
    return bw, 2 * 1024 ** 3 / min(t) / 1e12


def run_case(name, s, axis, dtype, device, mode, warmup, repeats, peaks):
    grad = mode == "fwd+bwd"
    q, k, v, r, gamma = make_inputs(s, dtype, device, grad)
    go = torch.randn_like(v) if grad else None
    methods = {"composition": lambda: attention3d_ref(q, k, v, axis, 1, None, r, gamma)}
    notes = {}
    for bname, backend in _sdpa_backends(device):
        def f(backend=backend):
            with _sdpa_ctx(backend):
                return attention3d_sdpa(q, k, v, axis, 1, None, r, gamma)
        try:  # does this backend take the case?
            out = f()
            if grad:
                out.backward(go)
            methods[f"sdpa[{bname}]"] = f
        except RuntimeError as e:
            notes[f"sdpa[{bname}]"] = "skipped: " + str(e).strip().splitlines()[0][:90]
    methods["attention3d"] = lambda: attention3d(q, k, v, axis, residual=r, gamma=gamma)
    entry = attn_ops.explain(q, k, v, axis)

    with torch.no_grad():
        ref = attention3d_ref(q.float(), k.float(), v.float(), axis, 1, None, r.float(), gamma.float())
        err = (attention3d(q, k, v, axis, residual=r, gamma=gamma).float() - ref).abs().max().item()

    def step(fn):
        if not grad:
            def run_fwd():
                with torch.no_grad():
                    return fn()
            return run_fwd

        def run():
            for t in (q, k, v, r, gamma):
                t.grad = None
            fn().backward(go)
        return run

    fns = {m: step(fn) for m, fn in methods.items()}
    ms = {k: v["median_ms"] for k, v in interleaved(fns, device, warmup, repeats).items()}
    nbytes, flops = traffic_and_flops(s, axis, dtype, mode)
    bw, tf = peaks
    roof_ms = max(nbytes / (bw * 1e9), flops / (tf * 1e12)) * 1e3 if bw and tf else None
    best_base = min(v for m, v in ms.items() if m != "attention3d")
    rows = []
    for m, t in ms.items():
        rows.append(dict(case=name, axis=axis, mode=mode, method=m, ms=t, gbps=nbytes / t / 1e6,
                         tflops=flops / t / 1e9, roofline=(roof_ms / t) if roof_ms else None,
                         peak_mem_mb=(lambda b: b / 2**20 if b is not None else None)(peak_memory(fns[m], device)),
                         speedup=(best_base / t) if m == "attention3d" else None))
    nseq, L = seq_count_and_length((s["B"], s["dk"], s["T"], s["H"], s["W"]), axis)
    return rows, dict(case=name, axis=axis, mode=mode, seqs=nseq, L=L, dispatch=entry, max_abs_err_vs_fp32=err,
                      skipped=notes, best_baseline=min((m for m in ms if m != "attention3d"), key=ms.get))


def tiny_overhead(warmup, repeats):
    """attention3d vs the composition at TINY, one thread: microseconds per call (median of interleaved
    rounds of 200 calls), forward (no grad) and forward+backward (residual + gamma). Wall time decides
    the target; the thread's CPU time is kept too (less disturbed by other jobs on a shared machine)."""
    import time as _time
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, k, v, r, gamma = make_inputs(TINY, torch.float32, torch.device("cpu"), True)
        go = torch.randn_like(v)
        out = {}
        for mode in ("fwd", "fwd+bwd"):
            fns = {"attention3d": lambda: attention3d(q, k, v, "spatial", residual=r, gamma=gamma),
                   "composition": lambda: attention3d_ref(q, k, v, "spatial", 1, None, r, gamma)}
            if mode == "fwd":
                fns = {m: (lambda f=f: _no_grad(f)) for m, f in fns.items()}
            else:
                fns = {m: (lambda f=f: f().backward(go)) for m, f in fns.items()}
            times = {m: [] for m in fns}
            cpu_times = {m: [] for m in fns}
            for f in fns.values():
                for _ in range(warmup * 20):
                    f()
            for _ in range(repeats):
                for m, f in fns.items():
                    t0, c0 = _time.perf_counter(), _time.thread_time()
                    for _ in range(200):
                        f()
                    cpu_times[m].append((_time.thread_time() - c0) / 200 * 1e6)
                    times[m].append((_time.perf_counter() - t0) / 200 * 1e6)
            med = {m: statistics.median(t) for m, t in times.items()}
            cmed = {m: statistics.median(t) for m, t in cpu_times.items()}
            out[mode] = dict(attention3d_us=med["attention3d"], composition_us=med["composition"],
                             attention3d_cpu_us=cmed["attention3d"], composition_cpu_us=cmed["composition"],
                             cpu_time_ratio=cmed["attention3d"] / cmed["composition"],
                             ratio=med["attention3d"] / med["composition"], shape=TINY, threads=1,
                             target=TINY_TARGET[mode], met=med["attention3d"] / med["composition"] <= TINY_TARGET[mode])
        return out
    finally:
        torch.set_num_threads(prev)


def _print_tiny(tiny):
    print("\ntiny problem, 1 thread (per-call overhead): attention3d / composition")
    for k_, v_ in tiny.items():
        print(f"  {k_:14s} attention3d {v_['attention3d_us']:.1f} us, composition {v_['composition_us']:.1f} us "
              f"-> {v_['ratio']:.2f}x the composition's time (target <= {v_['target']:g}x: "
              f"{'met' if v_['met'] else 'NOT met'}); thread CPU time {v_['cpu_time_ratio']:.2f}x")


def _no_grad(f):
    with torch.no_grad():
        return f()


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["case"], r["axis"]) for r in rows}, key=lambda x: (x[0], AXES.index(x[1])))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axs = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(keys)), 8), squeeze=False)
    for ax, mode in zip(axs[:, 0], ("fwd", "fwd+bwd")):
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            ys = []
            for key in keys:
                hit = [r["ms"] for r in rows if (r["case"], r["axis"]) == key and r["mode"] == mode and r["method"] == m]
                ys.append(hit[0] if hit else float("nan"))
            ax.bar([j + i * width for j in range(len(keys))], ys, width, label=m)
        ax.set_yscale("log")
        ax.set_ylabel(f"{mode} median ms (log)")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{c.removeprefix('cpu_')} {a}" for c, a in keys], fontsize=7, rotation=35, ha="right")
        ax.legend(fontsize=7)
    axs[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp16 on GPU, fp32 on CPU")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--axes", nargs="*", default=list(AXES), choices=list(AXES))
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=None, help="default 30 on GPU, 21 on CPU")
    ap.add_argument("--replot", default=None, help="only redraw the PNG of this results JSON")
    ap.add_argument("--machine-note", default="", help="saved in the JSON (e.g. 'shared with other jobs')")
    ap.add_argument("--tiny-only", action="store_true",
                    help="CPU: only the tiny-size per-call overhead section (writes attn3d_tiny_*.json)")
    args = ap.parse_args(argv)
    if (args.repeats is not None and args.repeats < 1) or args.warmup < 0 or \
            (args.threads is not None and args.threads < 1):
        ap.error("need --repeats >= 1, --warmup >= 0, --threads >= 1")
    if not args.axes or not args.modes:
        ap.error("--axes and --modes need at least one value")
    table = CPU_SHAPES if torch.device(args.device).type == "cpu" else GPU_SHAPES
    unknown = [n for n in (args.shapes or []) if n not in table]
    if unknown:
        ap.error(f"--shapes: unknown {unknown} for --device {args.device}; choose from {list(table)}")
    if args.tiny_only:
        tiny = tiny_overhead(args.warmup, args.repeats or 31)
        _print_tiny(tiny)
        path = write_results("attn3d_tiny", torch.device("cpu"), dict(machine=args.machine_note, tiny_overhead=tiny))
        print(f"wrote {path}")
        return
    if args.replot:
        with open(args.replot) as f:
            doc = json.load(f)
        plot(doc["rows"], args.replot[:-5] + ".png", f"attention3d vs PyTorch ({doc['device']['name']}, {doc['dtype']})")
        return
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = device.type == "cpu"
    dtype = DTYPES[args.dtype or ("fp32" if cpu else "fp16")]
    table = CPU_SHAPES if cpu else GPU_SHAPES
    shapes = {k: table[k] for k in (args.shapes or table)}
    repeats = args.repeats or (21 if cpu else 30)
    info = device_info(device)
    if cpu:
        bw, tf = cpu_peaks(device)
        peak_src = "measured on this CPU (64 MiB copy, 1024^3 fp32 matmul)"
        print(f"CPU-ONLY RUN: reduced shapes on the CPU path ({info['name']}, {torch.get_num_threads()} threads). "
              f"These numbers are CPU numbers; GPU shapes run when a GPU is present.")
    else:
        bw, tf = info.get("peak_gbps"), info.get("peak_tflops_fp16")
        if dtype == torch.float32 and tf:
            tf = None  # no fp32 peak in the table: report GB/s and TFLOP/s only
        peak_src = "datasheet (benchmarks/common.py GPU_PEAKS)"
        print(f"GPU run on {info['name']} ({info.get('capability')}), {dtype}")
    print(f"roofline peaks: {bw and round(bw, 1)} GB/s, {tf and round(tf, 2)} TFLOP/s ({peak_src})\n")

    rows, cases = [], []
    for name, s in shapes.items():
        for axis in [a for a in args.axes if a in s.get("axes", AXES)]:
            for mode in args.modes:
                r, c = run_case(name, s, axis, dtype, device, mode, args.warmup, repeats, (bw, tf))
                rows += r
                cases.append(c)
                print(f"{name} {axis:8s} {mode:7s} L={c['L']:<5d} seqs={c['seqs']:<6d} -> {c['dispatch']}")
                for m, why in c["skipped"].items():
                    print(f"    {m} {why}")
    print()
    cols = [("case", "case"), ("axis", "axis"), ("mode", "mode"), ("method", "method"), ("ms", "median ms"),
            ("gbps", "GB/s"), ("tflops", "TFLOP/s"), ("roofline", "roofline"), ("peak_mem_mb", "peak MiB"),
            ("speedup", "x best baseline")]
    print_table(rows, cols)

    tiny = tiny_overhead(args.warmup, max(repeats, 31)) if cpu else None
    if tiny:
        _print_tiny(tiny)

    ours = [r for r in rows if r["method"] == "attention3d"]
    slower = [f"{r['case']}/{r['axis']}/{r['mode']} ({r['speedup']:.2f}x)" for r in ours if r["speedup"] < 1.0]
    print(f"\nattention3d vs best baseline: geometric-mean speed-up "
          f"{statistics.geometric_mean([r['speedup'] for r in ours]):.2f}x over {len(ours)} cases; "
          f"slower in {len(slower)}: {', '.join(slower) if slower else 'none'}")
    payload = dict(cpu_only=cpu, note=("CPU-only run: reduced shapes on the CPU path" if cpu else "GPU run"),
                   machine=args.machine_note, tiny_overhead=tiny,
                   geomean_speedup_vs_best_baseline=statistics.geometric_mean([r["speedup"] for r in ours]),
                   min_speedup_vs_best_baseline=min(r["speedup"] for r in ours),
                   dtype=str(dtype).replace("torch.", ""), repeats=repeats, peaks=dict(gbps=bw, tflops=tf, source=peak_src),
                   shapes=shapes, cases=cases, rows=rows)
    # a run over part of the table must not overwrite the full run's file that the README cites
    subset = args.shapes is not None or set(args.axes) != set(AXES) or set(args.modes) != {"fwd", "fwd+bwd"}
    path = write_results("attn3d_subset" if subset else "attn3d", device, payload)
    print(f"wrote {path}")
    png = path[:-5] + ".png"
    try:
        plot(rows, png, f"attention3d vs PyTorch ({info['name']}, {payload['dtype']})")
        print(f"wrote {png}")
    except ImportError as e:  # the numbers are in the JSON; a machine without matplotlib only lacks the picture
        print(f"no plot ({e}); redraw later with --replot {path}")


if __name__ == "__main__":
    main()
