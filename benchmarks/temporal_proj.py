"""Benchmark: stssa_kernels.temporal_proj (fused slow/fast Q/K/V projections) vs Conv3d compositions.

    python benchmarks/temporal_proj.py [--device cuda|cpu] [--dtype fp16|bf16|fp32] [--threads 2]
                                       [--shapes ...] [--repeats N] [--tag NAME]

Methods, all producing the six projections of one input (slow q, k, v with 7x1x1 kernels, fast q, k, v
with 1x1x1, zero padding in time):
  fused          the op as dispatched (the table row that ran is printed and saved);
  fused[<b>]     the op with backend <b> forced: triton (CUDA sm_80+), gemm, conv, conv_kt;
  six_conv       six separate Conv3d (``temporal_proj_ref``, the model's use_fused=False path);
  conv_per_kt    one F.conv3d per kernel size with that size's weights concatenated beforehand (the
                 best case of the "single call" baseline: no per-call weight concatenation).
The fused op's per-call weight packing is included in its time. Inputs are contiguous [B, C, T, H, W]
(what RoIAlign / a Conv3d produce); modes: fwd, and fwd+bwd (grads of x, all weights and biases).

Shapes. GPU (the issue's STSSA shapes): RoI features K=32, C=2048, T=8/16, 7x7 with Q/K width 512 (V
keeps C=2048) or 2048; backbone map B=8, C=2048, T=16, 16x16. CPU: the same structure at reduced
sizes (C=256, Q/K 64, V 256), since the full shapes take minutes per call on 2 cores; the CPU rows
say CPU and are not a statement about GPU speed.

FLOPs are counted as Conv3d counts them, 2 * B*T*H*W * C * sum_i kt_i * C_out_i for the forward
(padding taps included) and 3x that for fwd+bwd; TFLOP/s and the fraction of the GPU's dense fp16/bf16
matrix-unit peak (benchmarks/common.py GPU_PEAKS) follow from the median time.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, interleaved, print_table, write_results  # noqa: E402

import stssa_kernels  # noqa: E402
from stssa_kernels.ops import temporal_proj as tp_ops  # noqa: E402
from stssa_kernels.reference import temporal_proj_ref  # noqa: E402

KT = [7, 7, 7, 1, 1, 1]  # slow q, k, v; fast q, k, v


def stssa_out(qk: int, v: int) -> list:
    return [qk, qk, v, qk, qk, v]


GPU_SHAPES = {
    "roi_t8_e512": dict(B=32, C=2048, T=8, H=7, W=7, out=stssa_out(512, 2048)),
    "roi_t16_e512": dict(B=32, C=2048, T=16, H=7, W=7, out=stssa_out(512, 2048)),
    "roi_t16_e2048": dict(B=32, C=2048, T=16, H=7, W=7, out=stssa_out(2048, 2048)),
    "backbone_t16_e512": dict(B=8, C=2048, T=16, H=16, W=16, out=stssa_out(512, 2048)),
}
CPU_SHAPES = {
    "cpu_roi_t8": dict(B=8, C=256, T=8, H=7, W=7, out=stssa_out(64, 256)),
    "cpu_roi_t16": dict(B=8, C=256, T=16, H=7, W=7, out=stssa_out(64, 256)),
    "cpu_backbone_t8": dict(B=2, C=256, T=8, H=8, W=8, out=stssa_out(64, 256)),
}


def make_inputs(s: dict, device, dtype, gen):
    x = torch.randn(s["B"], s["C"], s["T"], s["H"], s["W"], generator=gen).to(device, dtype)
    ws = [(torch.randn(n, s["C"], k, 1, 1, generator=gen) / (s["C"] * k) ** 0.5).to(device, dtype)
          for n, k in zip(s["out"], KT)]
    bs = [(0.1 * torch.randn(n, generator=gen)).to(device, dtype) for n in s["out"]]
    return x, ws, bs


def methods(ws, bs, backends):
    """name -> f(x, ws, bs) returning the six outputs (or per-kt groups)."""
    groups = {}
    for i, k in enumerate(KT):
        groups.setdefault(k, []).append(i)
    cat_w = {k: torch.cat([ws[i] for i in idx]).detach() for k, idx in groups.items()}
    cat_b = {k: torch.cat([bs[i] for i in idx]).detach() for k, idx in groups.items()}

    def conv_per_kt(x, ws, bs, cw=None, cb=None):
        cw, cb = cw or cat_w, cb or cat_b
        return [F.conv3d(x, cw[k], cb[k], padding=(k // 2, 0, 0)) for k in cw]

    ms = {"fused": stssa_kernels.temporal_proj}
    ms.update({f"fused[{b}]": stssa_kernels.temporal_proj for b in backends})  # run inside DISPATCH.force(b)
    ms["six_conv"] = temporal_proj_ref
    ms["conv_per_kt"] = conv_per_kt
    # fwd+bwd of conv_per_kt differentiates its concatenated (leaf) weights, as a model storing them so would
    leaf_w = {k: v.clone().requires_grad_() for k, v in cat_w.items()}
    leaf_b = {k: v.clone().requires_grad_() for k, v in cat_b.items()}
    return ms, (conv_per_kt, leaf_w, leaf_b)


def _forced(backend, fn):
    if backend is None:
        return fn()
    with tp_ops.DISPATCH.force(backend):
        return fn()


#: per-call overhead at tiny sizes, 1 thread (issue #11 item 1): one projection vs one conv3d, and the
#: STSSA six vs six conv3d; forward within 2x, forward+backward at parity or better is the target
TINY_TARGET = {"fwd": 2.0, "fwd+bwd": 1.0}  # max ratio temporal_proj / conv3d-per-projection
TINY = {"tiny_one_kt3": dict(B=1, C=8, T=4, H=3, W=3, out=[8], kt=[3]),
        "tiny_stssa_six": dict(B=1, C=8, T=4, H=3, W=3, out=[8] * 6, kt=KT)}


def tiny_overhead(rounds: int = 21, calls: int = 100) -> dict:
    """temporal_proj vs one conv3d per projection at TINY, one thread: us per call (median of
    interleaved rounds), forward (no grad) and forward+backward. Wall time decides the target; the
    thread's CPU time (``time.thread_time``) is kept too, as a view less disturbed by other jobs on a
    shared machine."""
    import statistics
    import time
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    out = {}
    try:
        for name, s in TINY.items():
            x = torch.randn(s["B"], s["C"], s["T"], s["H"], s["W"], generator=gen, requires_grad=True)
            ws = [torch.randn(n, s["C"], k, 1, 1, generator=gen, requires_grad=True) for n, k in zip(s["out"], s["kt"])]
            bs = [torch.randn(n, generator=gen, requires_grad=True) for n in s["out"]]
            gys = [torch.randn(s["B"], n, s["T"], s["H"], s["W"], generator=gen) for n in s["out"]]
            for mode in ("fwd", "fwd+bwd"):
                fns = {"temporal_proj": lambda: stssa_kernels.temporal_proj(x, ws, bs),
                       "conv3d_each": lambda: temporal_proj_ref(x, ws, bs)}
                if mode == "fwd":
                    fns = {k: (lambda f=f: _no_grad(f)) for k, f in fns.items()}
                else:
                    fns = {k: (lambda f=f: torch.autograd.backward(f(), gys)) for k, f in fns.items()}
                times = {k: [] for k in fns}
                cpu_times = {k: [] for k in fns}
                for f in fns.values():
                    for _ in range(20):
                        f()
                for _ in range(rounds):
                    for k, f in fns.items():
                        t0, c0 = time.perf_counter(), time.thread_time()
                        for _ in range(calls):
                            f()
                        cpu_times[k].append((time.thread_time() - c0) / calls * 1e6)
                        times[k].append((time.perf_counter() - t0) / calls * 1e6)
                med = {k: statistics.median(v) for k, v in times.items()}
                cmed = {k: statistics.median(v) for k, v in cpu_times.items()}
                out[f"{name}/{mode}"] = dict(temporal_proj_us=med["temporal_proj"], conv3d_each_us=med["conv3d_each"],
                                             cpu_time_ratio=cmed["temporal_proj"] / cmed["conv3d_each"],
                                             temporal_proj_cpu_us=cmed["temporal_proj"],
                                             conv3d_each_cpu_us=cmed["conv3d_each"],
                                             ratio=med["temporal_proj"] / med["conv3d_each"], shape=s, threads=1,
                                             target=TINY_TARGET[mode],
                                             met=med["temporal_proj"] / med["conv3d_each"] <= TINY_TARGET[mode],
                                             dispatch=tp_ops.explain(x, s["out"], s["kt"]))
    finally:
        torch.set_num_threads(prev)
    return out


def _no_grad(f):
    with torch.no_grad():
        return f()


def _print_tiny(tiny):
    print("\ntiny problems, 1 thread: temporal_proj / one conv3d per projection")
    for k, v in tiny.items():
        print(f"  {k:24s} {v['temporal_proj_us']:.1f} us vs {v['conv3d_each_us']:.1f} us -> {v['ratio']:.2f}x "
              f"(target <= {v['target']:g}x: {'met' if v['met'] else 'NOT met'}); thread CPU time "
              f"{v['cpu_time_ratio']:.2f}x")


def run(args):
    device = torch.device(args.device)
    if args.tiny_only:
        tiny = tiny_overhead()
        _print_tiny(tiny)
        path = write_results("temporal_proj_tiny", torch.device("cpu"), {"machine": args.machine_note,
                                                                          "tiny_overhead": tiny})
        print(f"wrote {path}")
        return
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    info = device_info(device)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    names = args.shapes.split(",") if args.shapes else list(shapes)
    backends = ["gemm", "conv", "conv_kt"]
    if device.type == "cuda" and tp_ops._arch.triton_missing("temporal_proj") is None \
            and tp_ops._arch.capability(device) >= 80 and dtype != torch.float32:
        backends.insert(0, "triton")
    peak = info.get("peak_tflops_fp16") if dtype in (torch.float16, torch.bfloat16) else None
    print(f"device: {info['name']}" + (f" ({info['threads']} threads)" if device.type == "cpu" else "")
          + f", dtype {args.dtype}" + (", REDUCED CPU shapes" if device.type == "cpu" else ""))
    gen = torch.Generator().manual_seed(0)
    rows, routes = [], {}
    for sname in names:
        s = shapes[sname]
        x, ws, bs = make_inputs(s, device, dtype, gen)
        route = tp_ops.select(x, s["out"], KT)
        routes[sname] = {"backend": route.backend, "why": route.why}
        print(f"\n{sname}: {s}  -> dispatched backend '{route.backend}' ({route.why})", flush=True)
        flop = 2 * s["B"] * s["T"] * s["H"] * s["W"] * s["C"] * sum(k * n for k, n in zip(KT, s["out"]))
        ms, (cpk, leaf_w, leaf_b) = methods(ws, bs, backends)
        xr = x.detach().requires_grad_()
        wr = [w.detach().requires_grad_() for w in ws]
        br = [b.detach().requires_grad_() for b in bs]
        # incoming gradients: fresh random tensors (not the stride-0 ones of .sum())
        gys = [torch.randn(s["B"], n, s["T"], s["H"], s["W"], generator=gen).to(device, dtype) for n in s["out"]]
        gys_kt = [torch.cat([gys[i] for i, k in enumerate(KT) if k == kk], 1) for kk in dict.fromkeys(KT)]
        for mode in ("fwd", "fwd+bwd"):
            fns = {}
            for name, f in ms.items():
                b = name[6:-1] if name.startswith("fused[") else None  # forward and backward on backend b
                if mode == "fwd":
                    fns[name] = (lambda f=f, b=b: _forced(b, lambda: f(x, ws, bs)))
                elif name == "conv_per_kt":
                    fns[name] = (lambda: torch.autograd.backward(cpk(xr, None, None, leaf_w, leaf_b), gys_kt))
                else:
                    fns[name] = (lambda f=f, b=b: _forced(b, lambda: torch.autograd.backward(f(xr, wr, br), gys)))
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                res = interleaved(fns, device, args.warmup, args.repeats)
            mult = 1 if mode == "fwd" else 3
            best_single = res["conv_per_kt"]["median_ms"]
            for name, r in res.items():
                tflops = mult * flop / (r["median_ms"] * 1e-3) / 1e12
                rows.append({"shape": sname, "mode": mode, "method": name, "median_ms": r["median_ms"],
                             "min_ms": r["min_ms"], "repeats": r["repeats"], "tflops": tflops,
                             "peak_frac": tflops / peak if peak else None,
                             "vs_six_conv": res["six_conv"]["median_ms"] / r["median_ms"],
                             "vs_conv_per_kt": best_single / r["median_ms"],
                             "backend": route.backend if name == "fused" else
                             name[6:-1] if name.startswith("fused[") else "cudnn/onednn"})
            fused = res["fused"]["median_ms"]
            print(f"  {mode:8s} fused {fused:9.3f} ms | six_conv x{res['six_conv']['median_ms'] / fused:.2f}"
                  f" | conv_per_kt x{best_single / fused:.2f}", flush=True)
            for t in (xr, *wr, *br, *leaf_w.values(), *leaf_b.values()):
                t.grad = None
    tiny = tiny_overhead() if device.type == "cpu" else None
    if tiny:
        _print_tiny(tiny)
    print()
    print_table(rows, [("shape", "shape"), ("mode", "mode"), ("method", "method"), ("backend", "backend"),
                       ("median_ms", "median ms"), ("tflops", "TFLOP/s"), ("peak_frac", "of peak"),
                       ("vs_six_conv", "x six_conv"), ("vs_conv_per_kt", "x conv_per_kt")])
    # a run over part of the table, or at another thread count, must not overwrite the file the README cites
    tag = args.tag or (f"{args.threads}thread" if device.type == "cpu" and args.threads != 2 else "")
    tag = "_".join(t for t in (tag, "subset" if args.shapes else "") if t)
    path = write_results("temporal_proj" + (f"_{tag}" if tag else ""), device, {
        "dtype": args.dtype, "kernel_sizes": KT, "shapes": {k: shapes[k] for k in names},
        "reduced_cpu_shapes": device.type == "cpu", "repeats": args.repeats, "warmup": args.warmup,
        "timing": "median of round-robin interleaved calls, device synchronised",
        "flops": "2*B*T*H*W*C*sum(kt_i*C_out_i) forward, x3 for fwd+bwd",
        "peak_tflops_matrix": peak, "dispatch": routes, "rows": rows, "tiny_overhead": tiny,
        "machine": args.machine_note})
    print(f"\nwrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                    help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--shapes", default=None, help="comma-separated names (default: all for the device)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--tag", default="", help="suffix of the result file name (e.g. 1thread)")
    ap.add_argument("--machine-note", default="", help="saved in the JSON (e.g. 'shared with other jobs')")
    ap.add_argument("--tiny-only", action="store_true",
                    help="only the tiny-size per-call overhead section, CPU (writes temporal_proj_tiny_*.json)")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("fp32" if cpu else "fp16")
    args.repeats = args.repeats if args.repeats is not None else (9 if cpu else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("need --repeats >= 1, --warmup >= 0, --threads >= 1")
    table = CPU_SHAPES if cpu else GPU_SHAPES
    unknown = [n for n in (args.shapes.split(",") if args.shapes else []) if n not in table]
    if unknown:
        ap.error(f"--shapes: unknown {unknown} for --device {args.device}; choose from {list(table)}")
    run(args)


if __name__ == "__main__":
    main()
