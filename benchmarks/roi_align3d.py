"""Benchmark: stssa_kernels.roi_align3d vs torchvision compositions, forward / backward / both.

    python benchmarks/roi_align3d.py [--device cuda|cpu] [--threads 2] [--repeats N] [--shapes ava_t8,small]
                                     [--boxes person,far] [--modes fwd,fwd+bwd]

Baselines, all producing the same [K, C, T, 7, 7] tensor:
  tv_fold  torchvision.ops.roi_align once, time folded into the batch (permute copy of the features);
  tv_loop  torchvision.ops.roi_align once per frame.
Shapes: AVA (N=8 clips, C=2048, T=8 and 16, 16x16 map, K=32 boxes, 7x7, spatial_scale 1/16) and a smaller
one (N=4, C=512, T=8, 16x16, K=16). Box workloads: "person" (person-sized boxes, 15-60% x 30-90% of the
frame) and "far" (people far from the camera: 8-68 px boxes on the 256 px frame). All methods are timed
in interleaved rounds (one call of each per round, median), so that load drift on a shared CPU hits them
alike. The forward is also reported against the memory floor: the unique input bytes under the boxes read
once plus the output written once, at the device's peak bandwidth on GPU, and on CPU at the bandwidth of
a copy of the feature map measured in the same rounds (``mem_copy``: reads and writes every byte once);
on CPU also against the same floor counted in whole 64-byte cache lines (``line_floor_ms``), which is
what a CPU moves (a 16-pixel fp32 row is one line, so a 3-pixel far-away box costs the whole line).

On CPU, each call's outputs are fresh memory, and with PyTorch's default allocator a large tensor's first
touch costs a page fault per 4 KiB page (on this project's VM ~95 ms per 236 MB, the output and input
gradient of one AVA T=8 forward+backward: more than the kernels' own time). ``THP_MEM_ALLOC_ENABLE=1``
(PyTorch's switch for transparent huge pages on large CPU allocations; set it in the environment, it is
read once) cuts that to ~27 ms; the setting is saved in the results JSON. ``--pause-probe ava_t8:far`` times
our forward+backward alone, back to back and after seconds of sleep (see :func:`pause_probe`).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, interleaved, print_table, write_results  # noqa: E402

import stssa_kernels  # noqa: E402
from stssa_kernels.reference.roi_align3d import roi_align3d_ref, roi_align3d_ref_loop  # noqa: E402

SHAPES = {
    "ava_t8": dict(N=8, C=2048, T=8, H=16, W=16, K=32),
    "ava_t16": dict(N=8, C=2048, T=16, H=16, W=16, K=32),
    "small": dict(N=4, C=512, T=8, H=16, W=16, K=16),
}
OUT, SCALE, SR, ALIGNED = 7, 1 / 16, -1, True


def person_boxes(n, k, img, gen, device, dtype):
    """Person-like boxes in a img x img frame: widths 15-60%, heights 30-90% of the frame."""
    w = img * (0.15 + 0.45 * torch.rand(k, generator=gen))
    h = img * (0.3 + 0.6 * torch.rand(k, generator=gen))
    x1 = (img - w) * torch.rand(k, generator=gen)
    y1 = (img - h) * torch.rand(k, generator=gen)
    idx = torch.arange(k) % n
    return torch.stack([idx.float(), x1, y1, x1 + w, y1 + h], 1).to(device, dtype)


def far_boxes(n, k, img, gen, device, dtype):
    """Far-away people: square-ish boxes of 8-68 px on a img x img frame (6-27% of a 256 px frame)."""
    size = 8 + 60 * torch.rand(k, 2, generator=gen)
    xy = (img - size) * torch.rand(k, 2, generator=gen)
    idx = torch.arange(k) % n
    return torch.cat([idx[:, None].float(), xy, xy + size], 1).to(device, dtype)


BOXES = {"person": person_boxes, "far": far_boxes}


def _box_mask(boxes, shape):
    """[N, H, W] bool: the pixels the boxes' bilinear samples can touch (+1 pixel for the neighbours)."""
    n, c, t, h, w = shape
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    for b, x1, y1, x2, y2 in boxes.double().cpu().tolist():
        xs, ys = x1 * SCALE - 0.5, y1 * SCALE - 0.5
        xe, ye = x2 * SCALE - 0.5, y2 * SCALE - 0.5
        mask[int(b), max(int(ys), 0):min(int(ye) + 2, h), max(int(xs), 0):min(int(xe) + 2, w)] = True
    return mask


def floor_bytes(boxes, shape, elem):
    """Unique input bytes under the boxes (+1 pixel for the bilinear neighbours) + output bytes."""
    n, c, t, h, w = shape
    unique_in = int(_box_mask(boxes, shape).sum()) * c * t
    out = boxes.shape[0] * c * t * OUT * OUT
    return (unique_in + out) * elem


def line_floor_bytes(boxes, shape, elem, line=64):
    """The same at cache-line granularity: the 64-byte lines of the contiguous NCTHW map that hold a
    pixel under the boxes (rows assumed to start on a line, true for W * elem % 64 == 0: 16 fp32 pixels
    are one line), + output bytes. Memory moves whole lines, so this is what a CPU reads at best; for
    small boxes it is well above the pixel floor."""
    n, c, t, h, w = shape
    mask = _box_mask(boxes, shape)
    per_line = max(line // elem, 1)
    lines = 0
    for x0 in range(0, w, per_line):
        lines += int(mask[:, :, x0:x0 + per_line].any(-1).sum())
    return (lines * line) * c * t + boxes.shape[0] * c * t * OUT * OUT * elem


def _features(sname, device, dtype):
    """Features x and output gradient g of one shape. Seeds per shape and per box set, so that a run of a
    subset (--shapes, --boxes) times the same inputs."""
    s = SHAPES[sname]
    gen = torch.Generator().manual_seed(list(SHAPES).index(sname))
    x = torch.randn(s["N"], s["C"], s["T"], s["H"], s["W"], generator=gen).to(device, dtype)
    g = torch.randn(s["K"], s["C"], s["T"], OUT, OUT, generator=gen).to(device, dtype)
    return x, g


def _boxes(sname, bname, device):
    s = SHAPES[sname]
    bgen = torch.Generator().manual_seed(100 + 10 * list(SHAPES).index(sname) + list(BOXES).index(bname))
    return BOXES[bname](s["N"], s["K"], s["H"] / SCALE, bgen, device, torch.float32)


def run(args):
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        sys.exit("torchvision's CPU roi_align has no fp16/bf16 kernel: use --dtype fp32 on CPU")
    info = device_info(device)
    print(f"device: {info['name']}" + (f" ({info['threads']} threads)" if device.type == "cpu" else "")
          + f", dtype {args.dtype}")
    methods = {
        "roi_align3d": lambda x, b: stssa_kernels.roi_align3d(x, b, OUT, SCALE, SR, ALIGNED),
        "tv_fold": lambda x, b: roi_align3d_ref(x, b, OUT, SCALE, SR, ALIGNED),
        "tv_loop": lambda x, b: roi_align3d_ref_loop(x, b, OUT, SCALE, SR, ALIGNED),
    }
    rows = []
    modes = args.modes.split(",")
    for sname in args.shapes.split(","):
        x, g = _features(sname, device, dtype)
        xr = x.detach().requires_grad_()
        copy_dst = torch.empty_like(x)
        for bname in args.boxes.split(","):
            boxes = _boxes(sname, bname, device)
            for mode in modes:
                fns = {}
                for name, f in methods.items():
                    if mode == "fwd":
                        fns[name] = lambda f=f: f(x, boxes)
                    elif mode == "bwd":
                        out = f(xr, boxes)
                        fns[name] = lambda out=out: torch.autograd.grad(out, xr, g, retain_graph=True)
                    else:
                        fns[name] = lambda f=f: torch.autograd.grad(f(xr, boxes), xr, g)
                if mode == "fwd" and device.type == "cpu":
                    fns["mem_copy"] = lambda: copy_dst.copy_(x)
                results = interleaved(fns, device, warmup=args.warmup, repeats=args.repeats)
                best_base = min(("tv_fold", "tv_loop"), key=lambda k: results[k]["median_ms"])
                ours = results["roi_align3d"]["median_ms"]
                row = {"shape": sname, "boxes": bname, "mode": mode,
                       **{k: v["median_ms"] for k, v in results.items()},
                       "best_baseline": best_base, "speedup": results[best_base]["median_ms"] / ours}
                if mode == "fwd":
                    fb = floor_bytes(boxes, x.shape, x.element_size())
                    if device.type == "cuda" and "peak_gbps" in info:
                        gbps = info["peak_gbps"]
                    elif device.type == "cpu":
                        gbps = 2 * x.numel() * x.element_size() / (results["mem_copy"]["median_ms"] * 1e-3) / 1e9
                        row["copy_gbps"] = gbps
                    else:
                        gbps = None
                    if gbps and device.type == "cpu":
                        lb = line_floor_bytes(boxes, x.shape, x.element_size())
                        row["line_floor_ms"] = lb / (gbps * 1e9) * 1e3
                        row["x_line_floor"] = ours / row["line_floor_ms"]
                    if gbps:
                        row["floor_ms"] = fb / (gbps * 1e9) * 1e3
                        row["floor_ratio"] = row["floor_ms"] / ours
                        row["x_floor"] = ours / row["floor_ms"]
                        row["gbps"] = fb / (ours * 1e-3) / 1e9
                rows.append(row)
                extra = f"  {row['x_floor']:.2f}x floor" if "x_floor" in row else ""
                extra += f", {row['x_line_floor']:.2f}x line floor" if "x_line_floor" in row else ""
                print(f"  {sname:8s} {bname:6s} {mode:8s} ours {ours:9.3f} ms  {best_base} "
                      f"{results[best_base]['median_ms']:9.3f} ms  speed-up x{row['speedup']:.2f}{extra}", flush=True)
    cols = [("shape", "shape"), ("boxes", "boxes"), ("mode", "mode"), ("roi_align3d", "ours ms"),
            ("tv_fold", "tv_fold ms"), ("tv_loop", "tv_loop ms"), ("speedup", "x best"), ("floor_ms", "floor ms"),
            ("x_floor", "ours/floor"), ("x_line_floor", "ours/line floor")]
    print()
    print_table(rows, cols)
    # a run over part of the table, or at another thread count, must not overwrite the file the README cites
    defaults = {"shapes": "small,ava_t8,ava_t16", "boxes": "person,far", "modes": "fwd,fwd+bwd"}
    subset = any(getattr(args, k) != v for k, v in defaults.items()) or (device.type == "cpu" and args.threads != 2)
    path = write_results("roi_align3d_subset" if subset else "roi_align3d", device, {
        "dtype": args.dtype, "output_size": OUT, "spatial_scale": SCALE, "sampling_ratio": SR, "aligned": ALIGNED,
        "shapes": {k: SHAPES[k] for k in args.shapes.split(",")}, "boxes": args.boxes, "repeats": args.repeats,
        "timing": "interleaved rounds (one call of each method per round, a fresh seeded order each round), median",
        "dispatch": "CUDA kernel (atomic backward)" if device.type == "cuda"
        else "CPU kernel (stable-ABI parallel_for, channel-block vectorised)",
        "allocator": {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")},
        "note": args.note, "rows": rows})
    print(f"\nwrote {path}")


def pause_probe(args):
    """CPU: our forward+backward alone, calls back to back against calls each after ``--pause-s`` of
    sleep, in alternating blocks (median per block; guest page faults per call from getrusage). On a VM
    with free page reporting, memory left free for seconds goes back to the host, and touching it again
    costs host faults that the guest neither counts nor can avoid."""
    import resource
    import statistics
    import time
    torch.set_num_threads(args.threads)
    sname, bname = args.probe_shape, args.probe_boxes
    x, g = _features(sname, torch.device("cpu"), torch.float32)
    boxes = _boxes(sname, bname, torch.device("cpu"))
    xr = x.requires_grad_()

    def fb():
        return torch.autograd.grad(stssa_kernels.roi_align3d(xr, boxes, OUT, SCALE, SR, ALIGNED), xr, g)

    fb()
    blocks = []
    for pause in [0.0, 0.0] + [args.pause_s, 0.0] * 3:
        ms, faults = [], []
        for _ in range(args.repeats):
            time.sleep(pause)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fb()
            ms.append((time.perf_counter() - t0) * 1e3)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        blocks.append(dict(pause_s=pause, median_ms=statistics.median(ms), median_faults=statistics.median(faults)))
        print(f"pause {pause:.1f} s: {blocks[-1]['median_ms']:.1f} ms per call, "
              f"{blocks[-1]['median_faults']:.0f} page faults", flush=True)
    path = write_results("roi_align3d_pause_probe", torch.device("cpu"), {
        "shape": SHAPES[sname], "boxes": bname, "mode": "fwd+bwd", "threads": args.threads,
        "repeats_per_block": args.repeats, "blocks": blocks,
        "allocator": {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}, "note": args.note})
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the issue's target is 2)")
    ap.add_argument("--shapes", default="small,ava_t8,ava_t16")
    ap.add_argument("--boxes", default="person,far", help="box workloads: person, far")
    ap.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, bwd, fwd+bwd")
    ap.add_argument("--note", default="", help="stored in the results JSON (e.g. 'machine shared with other jobs')")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--pause-probe", metavar="SHAPE:BOXES", default=None,
                    help="CPU only: time our forward+backward at SHAPE:BOXES (e.g. ava_t8:far) back to back "
                         "and after --pause-s of sleep, instead of the benchmark (see pause_probe)")
    ap.add_argument("--pause-s", type=float, default=3.0)
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    for opt, value, allowed in (("--shapes", args.shapes, SHAPES), ("--boxes", args.boxes, BOXES),
                                ("--modes", args.modes, ("fwd", "bwd", "fwd+bwd"))):
        bad = [v for v in value.split(",") if v not in allowed]
        if bad:
            ap.error(f"{opt}: unknown {bad}; choose from {list(allowed)} (comma-separated)")
    if (args.repeats is not None and args.repeats < 1) or (args.warmup is not None and args.warmup < 0) \
            or args.threads < 1:
        ap.error("need --repeats >= 1, --warmup >= 0, --threads >= 1")
    if args.pause_probe:
        if not cpu:
            sys.exit("--pause-probe is a CPU probe (page reporting on a VM): use --device cpu")
        args.probe_shape, _, args.probe_boxes = args.pause_probe.partition(":")
        if args.probe_shape not in SHAPES or args.probe_boxes not in BOXES:
            ap.error(f"--pause-probe: expected SHAPE:BOXES with SHAPE in {list(SHAPES)} and BOXES in "
                     f"{list(BOXES)}, got {args.pause_probe!r}")
        if args.pause_s < 0:
            ap.error(f"--pause-s: seconds of sleep before each call, >= 0, got {args.pause_s}")
        args.repeats = args.repeats or 7
        return pause_probe(args)
    args.repeats = args.repeats or (5 if cpu else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    run(args)


if __name__ == "__main__":
    main()
