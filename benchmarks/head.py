"""Benchmark: the STSSA head, forward + backward, fused ops vs the plain-PyTorch composition.

    python benchmarks/head.py [--device cuda|cpu] [--threads 2] [--repeats N] [--shapes ava|cpu_small]
                              [--dtype float32|bfloat16|float16]

The same ``STSSAHead`` (same parameters) runs with ``use_fused=True`` (``roi_align3d``, ``temporal_proj``,
``attention3d`` from stssa_kernels) and ``use_fused=False`` (torchvision ``roi_align`` with time folded into
the batch, ``F.conv3d`` per projection, permute + ``bmm`` + ``softmax`` + ``bmm``: stssa_kernels.reference).
Timed region: head forward from the res5 map and the boxes to the logits, sigmoid BCE, backward to the
head's parameters and to the feature map (the backbone's input gradient), device synchronised.

Shapes. ``ava`` (the issue's target): K=32 RoIs over N=8 clips, res5 map [8, 2048, 16, 16, 16], 7x7 RoIs,
both axes (SSFA + TSFA), both branches (slow 7x1x1, fast 1x1x1), 2 layers, 2048-d Q/K, LayerNorm: the
``stssa_ssfa_tsfa_gap2048_2l_ln`` config. ``cpu_small`` (what a 2-core CPU finishes in minutes): K=8 over N=2,
C=256, T=8, 8x8 map, 256-d Q/K, otherwise the same.

Timing. GPU: the variants one after another in this process (``measure``: warm-up, median, events). CPU:
each variant lives in its own worker process (for its RSS, below) and the parent times them in
interleaved rounds, one call per variant per round in a fresh seeded order, so that drift in machine
load hits every variant alike; only one worker computes at a time.

Peak memory. GPU: ``torch.cuda.max_memory_allocated`` above the memory held before the call (inputs and
parameters excluded). CPU: the growth of each worker's peak resident set (``ru_maxrss``) over its resident
set just before its first call, with every library either path imports lazily (torchvision for the
reference's RoIAlign) imported before that -- includes allocator caching, so it is an upper bound of the
tensors' peak, and it is labelled as RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, measure, peak_memory, print_table, timed_call, write_results  # noqa: E402

SHAPES = {
    "ava": dict(N=8, K=32, C=2048, T=16, H=16, W=16, embed=2048, layers=2),
    "cpu_small": dict(N=2, K=8, C=256, T=8, H=8, W=8, embed=256, layers=2),
    "tiny": dict(N=1, K=2, C=16, T=4, H=4, W=4, embed=16, layers=1),  # tests of the benchmark itself
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: fused ops; fused ops with the blocks' projections and attention recomputed in the backward; reference
VARIANTS = ("fused", "fused_recompute", "reference")


def make_head(shape: dict, recompute: bool = False):
    from stssa.models import STSSAHead
    return STSSAHead(shape["C"], num_classes=80, axes=("spatial", "temporal"), num_layers=shape["layers"],
                     embed_dim=shape["embed"], branches=("slow", "fast"), slow_kernel=7, layernorm=True,
                     pool="avg", dropout=0.0, spatial_scale=1 / 16, recompute=recompute)


def build(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0, recompute: bool = False):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = make_head(shape, recompute)
    with torch.no_grad():  # gamma = 0 would make the attention a no-op in the gradient; use trained-like values
        for n, p in head.named_parameters():
            if "gamma" in n:
                p.fill_(0.5)
    head = head.to(device=device, dtype=dtype)
    feats = torch.randn(shape["N"], shape["C"], shape["T"], shape["H"], shape["W"], generator=gen).to(device, dtype)
    feats.requires_grad_(True)
    img = shape["H"] * 16
    k = shape["K"]
    w = img * (0.15 + 0.45 * torch.rand(k, generator=gen))
    h = img * (0.3 + 0.6 * torch.rand(k, generator=gen))
    x1, y1 = (img - w) * torch.rand(k, generator=gen), (img - h) * torch.rand(k, generator=gen)
    rois = torch.stack([(torch.arange(k) % shape["N"]).float(), x1, y1, x1 + w, y1 + h], 1).to(device)
    labels = (torch.rand(k, 80, generator=gen) < 0.05).float().to(device)
    return head, feats, rois, labels


def step_fn(head, feats, rois, labels):
    def fn():
        head.zero_grad(set_to_none=True)
        feats.grad = None
        logits = head(feats, rois)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
        loss.backward()
    return fn


def dispatch_notes(head, feats, rois) -> dict:
    """Which dispatch entry each fused op takes at these shapes (as the ops report it)."""
    notes = {}
    try:
        from stssa_kernels.ops import attention3d as a3
        from stssa_kernels.ops import temporal_proj as tp
        with torch.no_grad():
            x = head.roi_features(feats, rois)
            blk = head.blocks[0]
            convs = blk._convs()
            notes["temporal_proj"] = tp.select(x, [c.out_channels for c in convs],
                                               [c.kernel_size[0] for c in convs]).backend
            q = x.new_empty((x.shape[0], blk.proj["slow"]["q"].out_channels) + tuple(x.shape[2:]))
            for axis in ("spatial", "temporal"):
                notes[f"attention3d_{axis}"] = a3.explain(q, q, x, axis, 1)
    except Exception as e:  # the notes are informative only
        notes["error"] = f"{type(e).__name__}: {e}"
    return notes


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _import_lazy_libraries() -> None:
    """What either path imports at its first call (the reference's RoIAlign: torchvision, 166 MB of RSS),
    imported before the memory baseline so that no variant's peak counts a library."""
    try:
        import torchvision.ops  # noqa: F401
    except ImportError:
        pass


def setup_one(args):
    """One variant's ``(row, fn, head, feats, rois)`` after its first call (the memory measurement)."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shape, dtype = SHAPES[args.shapes], DTYPES[args.dtype]
    head, feats, rois, labels = build(shape, device, dtype, recompute=args.variant == "fused_recompute")
    head.set_fused(args.variant != "reference")
    fn = step_fn(head, feats, rois, labels)
    row = {"variant": args.variant, "shapes": args.shapes, "dtype": args.dtype}
    if device.type == "cuda":
        fn()
        row["peak_mem_mb"] = peak_memory(fn, device) / 2**20
    else:
        _import_lazy_libraries()
        rss0 = _rss_bytes()
        fn()
        row["peak_rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0) / 2**20
    return row, fn, head, feats, rois


def run_one(args) -> dict:
    """One variant in this process, timed alone (GPU)."""
    row, fn, head, feats, rois = setup_one(args)
    row.update(measure(fn, torch.device(args.device), warmup=args.warmup, repeats=args.repeats))
    if args.variant == "fused":
        row["dispatch"] = dispatch_notes(head, feats, rois)
    return row


def serve_one(args) -> int:
    """CPU worker: set up one variant, print its row as JSON, then run one timed call per ``t`` line on
    stdin (printing the ms) until ``q`` (printing the dispatch notes as JSON)."""
    row, fn, head, feats, rois = setup_one(args)
    for _ in range(args.warmup):
        fn()
    print(json.dumps(row), flush=True)
    for line in sys.stdin:
        if line.strip() == "t":
            print(repr(timed_call(fn, torch.device("cpu"))), flush=True)
        else:
            print(json.dumps(dispatch_notes(head, feats, rois) if args.variant == "fused" else {}), flush=True)
            return 0
    return 0


def interleaved_cpu(args) -> list[dict]:
    """The three variants in three worker processes, timed in interleaved rounds (seeded order)."""
    import random
    import statistics

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    procs = {}
    try:
        rows = {}
        for variant in VARIANTS:  # one at a time: set-up (first call, RSS) of one does not slow another's
            cmd = [sys.executable, os.path.abspath(__file__), "--device", "cpu", "--threads", str(args.threads),
                   "--warmup", str(args.warmup), "--shapes", args.shapes, "--dtype", args.dtype,
                   "--variant", variant]
            procs[variant] = p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                                  env=env, bufsize=1)
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"head benchmark worker {variant!r} exited with {p.wait()} before its first call")
            rows[variant] = json.loads(line)
        times = {v: [] for v in VARIANTS}
        order, rng = list(VARIANTS), random.Random(0)
        for _ in range(args.repeats):
            rng.shuffle(order)
            for v in order:
                procs[v].stdin.write("t\n")
                times[v].append(float(procs[v].stdout.readline()))
        for v, p in procs.items():
            p.stdin.write("q\n")
            notes = json.loads(p.stdout.readline())
            if notes:
                rows[v]["dispatch"] = notes
            p.stdin.close()
            p.wait(timeout=60)
        for v, ts in times.items():
            rows[v].update({"median_ms": statistics.median(ts), "min_ms": min(ts), "repeats": len(ts)})
        return [rows[v] for v in VARIANTS]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


def saved_activations(shape: dict, dtype: torch.dtype, cc: int) -> list[dict]:
    """Bytes autograd keeps for the backward of one head forward (RoI features on; parameters, inputs and
    the RoIAlign excluded; each storage once), fused / fused with recompute / reference, at the GPU code
    path of compute capability ``cc``: the head runs on fake CUDA tensors (shapes, no data, no GPU), so
    the dispatch, the ops' fake kernels and autograd's saved tensors are those of a real GPU run. The
    activations that stay alive between forward and backward are what separates the variants' peak
    memory (weights, gradients and the backbone are common to both)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call
    from torch.multiprocessing.reductions import StorageWeakRef
    from stssa_kernels.ops._arch import assume_capability

    key = lambda t: StorageWeakRef(t.untyped_storage()).cdata  # noqa: E731
    rows = []
    for variant in VARIANTS:
        with torch.device("meta"):
            head = make_head(shape, recompute=variant == "fused_recompute")
        head.set_fused(variant != "reference")
        head.roi_features = lambda f, r: f  # x below is the RoI features already (RoIAlign excluded)
        saved, skip = {}, set()  # activation storage -> (bytes, shape, dtype); inputs and parameters

        def pack(t, saved=saved, skip=skip):
            if key(t) not in skip:
                saved[key(t)] = (t.untyped_storage().nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""))
            return t

        with assume_capability(cc), FakeTensorMode():
            params = {n: torch.empty(p.shape, dtype=dtype, device="cuda", requires_grad=True)
                      for n, p in head.named_parameters()}
            x = torch.empty(shape["K"], shape["C"], shape["T"], 7, 7, dtype=dtype, device="cuda", requires_grad=True)
            rois = torch.zeros(shape["K"], 5, device="cuda")
            labels = torch.zeros(shape["K"], 80, device="cuda")
            skip.update(key(t) for t in [*params.values(), x, rois, labels])
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits = functional_call(head, params, (x, rois))
                torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
        acts = sorted(saved.values(), reverse=True)
        rows.append({"variant": variant, "saved_mib": sum(v[0] for v in acts) / 2**20,
                     "largest": "; ".join(f"{b / 2**20:.0f} MiB {list(s)} {d}" for b, s, d in acts[:3])})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shapes", default=None, choices=sorted(SHAPES))
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # subprocess entry
    ap.add_argument("--saved-activations", action="store_true",
                    help="no timing: bytes saved for the backward on fake CUDA tensors of --arch (no GPU needed)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability for --saved-activations (75, 80, 90)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.shapes = args.shapes or ("ava" if device.type == "cuda" else "cpu_small")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.repeats is None:
        args.repeats = 20 if device.type == "cuda" else 11
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("need --repeats >= 1, --warmup >= 0, --threads >= 1")
    if args.variant:
        return serve_one(args)
    if args.saved_activations:
        shapes = args.shapes if args.shapes != "cpu_small" or device.type == "cuda" else "ava"
        dtype = DTYPES["bfloat16" if args.dtype == "float32" and device.type == "cpu" else args.dtype]
        rows = saved_activations(SHAPES[shapes], dtype, args.arch)
        ref = next(r["saved_mib"] for r in rows if r["variant"] == "reference")
        for r in rows:
            r["reference_over_this"] = ref / r["saved_mib"]
        print(f"Activations saved for the backward, STSSA head at {shapes} {SHAPES[shapes]}, {dtype}, the sm_{args.arch} "
              "code path on fake CUDA tensors (no GPU; RoIAlign, parameters and inputs excluded)")
        print_table(rows, [("variant", "variant"), ("saved_mib", "saved MiB"), ("reference_over_this", "ref / this"),
                           ("largest", "largest saved tensors")])
        path = write_results(f"head_saved_activations_sm{args.arch}", torch.device("cpu"),
                             {"shapes": {shapes: SHAPES[shapes]}, "dtype": str(dtype).replace("torch.", ""),
                              "simulated_arch": args.arch, "rows": rows,
                              "measure": "bytes of storages saved by autograd (saved_tensors_hooks), fake CUDA tensors"})
        print(f"wrote {path}")
        return 0

    if device.type == "cuda":
        rows = []
        for variant in VARIANTS:
            args.variant = variant
            rows.append(run_one(args))
            torch.cuda.empty_cache()
    else:
        rows = interleaved_cpu(args)  # a process per variant: the peak RSS of one must not include another's
    f, fr, r = rows
    mem_key = "peak_mem_mb" if device.type == "cuda" else "peak_rss_growth_mb"
    summary = {"speedup": r["median_ms"] / f["median_ms"],
               "memory_ratio": (r[mem_key] / f[mem_key]) if f[mem_key] > 0 else None,
               "speedup_recompute": r["median_ms"] / fr["median_ms"],
               "memory_ratio_recompute": (r[mem_key] / fr[mem_key]) if fr[mem_key] > 0 else None,
               "memory_measure": "cuda max_memory_allocated above baseline" if device.type == "cuda"
               else "growth of peak RSS over RSS before the first call (a process per variant, torchvision "
                    "imported before the baseline)",
               "timing": "sequential per variant, CUDA events" if device.type == "cuda"
               else "interleaved rounds over the variants' worker processes, seeded shuffled order"}
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(f"STSSA head fwd+bwd, shapes {args.shapes} {SHAPES[args.shapes]}, {args.dtype}, "
          f"{device_info(device)['name']}" + (f", {args.threads} threads" if device.type == "cpu" else ""))
    print_table(rows, [("variant", "variant"), ("median_ms", "median ms"), ("min_ms", "min ms"),
                       ("repeats", "n"), (mem_key, mem_key.replace("_", " "))])
    for tag, sp, mr in (("fused", "speedup", "memory_ratio"), ("fused_recompute", "speedup_recompute",
                                                                 "memory_ratio_recompute")):
        print(f"{tag} vs reference: speed-up {summary[sp]:.2f}x; memory ratio: "
              + (f"{summary[mr]:.2f}x" if summary[mr] else "n/a"))
    print(f"dispatch: {f.get('dispatch')}")
    if device.type == "cpu":
        print("NOTE: CPU run at reduced shapes; the targets (2x time, 2x memory) are for the GPU 'ava' shapes.")
    # another shape, dtype or thread count than the default run must not overwrite the file the README cites
    default = (("ava", "bfloat16") if device.type == "cuda" else ("cpu_small", "float32"))
    subset = (args.shapes, args.dtype) != default or (device.type == "cpu" and args.threads != 2)
    path = write_results("head_subset" if subset else "head", device, {"shapes": {args.shapes: SHAPES[args.shapes]}, "dtype": args.dtype,
                                          "rows": rows, "summary": summary,
                                          "reduced_shapes_on_cpu": device.type == "cpu"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
