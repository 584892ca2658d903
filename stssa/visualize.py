"""Pictures of action detections: boxes with their top actions drawn on frames, the demo's keyframe figure
(predictions beside the ground truth) and a per-class AP comparison plot.

* :func:`draw_detections` draws boxes and caption lines on an RGB frame (Pillow); :mod:`stssa.infer` uses it
  for the annotated keyframes and video.
* :func:`keyframe_figure` reads a detection CSV (the AVA form that :mod:`stssa.evaluate` reads), the ground
  truth and the frames, and shows a few keyframes: each ground-truth person's box and actions, and the top
  actions of the proposal that overlaps it most (IoU >= 0.5, as the evaluation matches them).
* :func:`plot_per_class_comparison` draws per-class AP of several runs side by side, with the mAPs.
* :func:`demo_pictures` is the last step of ``python -m stssa.demo``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["PALETTE", "draw_detections", "vis_scale", "top_actions", "group_detections", "keyframe_figure",
           "plot_per_class_comparison", "demo_pictures"]

# Colours told apart on the synthetic set's backgrounds (RGB).
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow's embedded TrueType font (FreeType builds)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


#: Longest side an enlarged frame may get (H.264 encoders refuse much larger frames; a 2x200 video
#: enlarged for a 360-pixel short side would be 360x36000).
MAX_VIS_SIDE = 4096


def vis_scale(height: int, width: int, min_short_side: int = 360) -> int:
    """Integer upscaling factor that makes the short side at least ``min_short_side`` (1 if it already is),
    so that captions stay legible on small frames, with the long side at most ``MAX_VIS_SIDE``."""
    want = int(np.ceil(min_short_side / max(1, min(height, width))))
    cap = MAX_VIS_SIDE // max(1, height, width)
    return max(1, min(want, cap))


def draw_detections(image: np.ndarray, boxes, captions: Sequence[Sequence[str]], colors=None, scale: int = 1,
                    line_width: Optional[int] = None, font_size: Optional[int] = None) -> np.ndarray:
    """Draw boxes with caption lines on a frame.

    Args:
        image: ``uint8 ndarray[H, W, 3]`` RGB.
        boxes: ``[N, 4]`` normalised ``(x1, y1, x2, y2)``.
        captions: ``N`` lists of text lines (e.g. ``"walk 0.81"``), drawn on a filled band above the box
            (inside it when the box touches the top).
        colors: ``N`` RGB tuples (default: :data:`PALETTE` in order).
        scale: integer nearest-neighbour upscaling of the frame before drawing.
        line_width, font_size: default from the output size.

    Returns:
        ``uint8 ndarray[H * scale, W * scale, 3]``; the input is not modified.
    """
    from PIL import Image, ImageDraw
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"draw_detections: image must be uint8 [H, W, 3], got {a.dtype} {a.shape}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(captions) != len(boxes):
        raise ValueError(f"draw_detections: {len(boxes)} boxes but {len(captions)} captions")
    if scale > 1:
        a = np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)
    h, w = a.shape[:2]
    img = Image.fromarray(np.ascontiguousarray(a))
    draw = ImageDraw.Draw(img)
    lw = line_width or max(1, round(min(h, w) / 180))
    fs = font_size or max(10, round(min(h, w) / 28))
    font = _font(fs)
    colors = colors or [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    px = [tuple(float(v) for v in np.clip(b, 0, 1) * [w, h, w, h]) for b in boxes]
    for (x1, y1, x2, y2), color in zip(px, colors):  # all boxes first: captions go on top of them
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=tuple(color), width=lw)
    placed: list[tuple[float, float, float, float]] = []
    for (x1, y1, x2, y2), lines, color in zip(px, captions, colors):
        if not lines:
            continue
        sizes = [draw.textbbox((0, 0), s, font=font) for s in lines]
        line_h = max(b[3] - b[1] for b in sizes) + 2
        band_w = max(b[2] - b[0] for b in sizes) + 4
        band_h = line_h * len(lines) + 2
        left = min(max(0.0, x1), max(0.0, w - band_w))
        # Above the box, else inside its top, else below it: the first place free of earlier captions.
        tops = [t for t in (y1 - band_h, y1, y2) if 0 <= t <= h - band_h] or [max(0.0, min(y1, h - band_h))]
        free = [t for t in tops if not any(left < r[2] and r[0] < left + band_w and t < r[3] and r[1] < t + band_h
                                           for r in placed)]
        top = (free or tops)[0]
        placed.append((left, top, left + band_w, top + band_h))
        draw.rectangle([left, top, left + band_w, top + band_h], fill=tuple(color))
        # Black or white text, whichever contrasts with the band.
        ink = (0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 140 else (255, 255, 255)
        for i, s in enumerate(lines):
            draw.text((left + 2, top + 1 + i * line_h - sizes[i][1]), s, fill=ink, font=font)
    return np.asarray(img)


def top_actions(scores: dict, k: int, names: dict) -> list[tuple[int, str, float]]:
    """The ``k`` highest of ``{action_id: score}`` as ``(id, name, score)``, best first (ties: lower id)."""
    best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [(a, names.get(a, str(a)), float(s)) for a, s in best]


def group_detections(rows) -> dict:
    """Detection rows ``(video_id, timestamp, x1, y1, x2, y2, action_id, score)`` -> ``{(video_id,
    timestamp): [(box (x1, y1, x2, y2), {action_id: score}), ...]}``, one entry per distinct box, in first-seen
    order."""
    out: dict = {}
    index: dict = {}
    for r in rows:
        key = (str(r[0]), int(r[1]))
        box = tuple(round(float(v), 6) for v in r[2:6])
        j = index.get((key, box))
        per_key = out.setdefault(key, [])
        if j is None:
            index[(key, box)] = len(per_key)
            per_key.append((box, {}))
            j = len(per_key) - 1
        per_key[j][1][int(r[6])] = float(r[7])
    return out


def _read_detection_rows(path) -> list[tuple]:
    from stssa.evaluate import _read_table  # the evaluator's own reader: same parsing, same errors
    t = _read_table(path, detections=True)
    return [(v, int(ts), *b, int(c), float(s)) for v, ts, b, c, s in
            zip(t.video, t.ts.tolist(), t.box.tolist(), t.cls.tolist(), t.score.tolist())]


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _pick_keyframes(gt: dict, n: int) -> list[tuple[str, int]]:
    """Per video (in order of first appearance) the keyframe with the most distinct actions (earliest on a
    tie); then the runners-up, until ``n``."""
    per_video: dict = {}
    for key, boxes in gt.items():
        per_video.setdefault(key[0], []).append((-len({a for b in boxes for a in b.labels}), key[1], key))
    ranked = [sorted(v) for v in per_video.values()]
    out = []
    depth = 0
    while len(out) < n and any(depth < len(r) for r in ranked):
        out.extend(r[depth][2] for r in ranked if depth < len(r) and len(out) < n)
        depth += 1
    return out


def keyframe_figure(frames_root, detections, groundtruth, out_png, labelmap=None, excluded=None,
                    num_keyframes: int = 4, topk: int = 3, title: Optional[str] = None,
                    model_name: str = "model", fps: int = 30, video_start_sec: int = 900) -> list[tuple[str, int]]:
    """A PNG of a few keyframes: each ground-truth person's box and actions beside the top-``topk`` actions
    predicted for the proposal that overlaps it most (IoU >= 0.5, dashed box); a tick marks a predicted action
    that is in the ground truth.

    Args:
        frames_root: AVA frame folders (``{video_id}/{video_id}_{n:06d}.jpg``).
        detections: detection CSV path or rows (AVA form, as written by :mod:`stssa.train` / :mod:`stssa.infer`).
        groundtruth: annotation CSV.
        out_png: output file.
        labelmap: classes shown (default: the 80 AVA classes); also gives the names.
        excluded: excluded-timestamps CSV: those keyframes are not picked.
        num_keyframes: how many keyframes (picked by :func:`_pick_keyframes`: varied actions, one per video
            first).
        fps, video_start_sec: keyframe ``s`` is frame index ``(s - video_start_sec) * fps``.

    Returns:
        The ``(video_id, timestamp)`` keys shown.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    from stssa.data.ava import frame_path, keyframe_index
    from stssa.data.formats import _as_labelmap, read_annotations, read_exclusions
    from stssa.data.labels import AVA_ACTIONS

    names, ids = _as_labelmap(labelmap) if labelmap is not None else \
        ({i: n for i, n, _ in AVA_ACTIONS}, {i for i, _, _ in AVA_ACTIONS})
    gt = read_annotations(groundtruth, ids)
    if excluded is not None:
        ex = read_exclusions(excluded)
        gt = {k: v for k, v in gt.items() if k not in ex}
    rows = _read_detection_rows(detections) if isinstance(detections, (str, Path)) else list(detections)
    dets = group_detections(r for r in rows if int(r[6]) in ids)
    keys = _pick_keyframes(gt, num_keyframes)
    if not keys:
        raise ValueError(f"keyframe_figure: no ground-truth keyframe in {groundtruth}")

    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 2.7 * len(keys)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.25]})
    for row, key in enumerate(keys):
        vid, ts = key
        path = frame_path(frames_root, vid, keyframe_index(ts, fps, video_start_sec))
        img = np.asarray(Image.open(path).convert("RGB"))
        h, w = img.shape[:2]
        ax, tx = axes[row]
        ax.imshow(img, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{vid} @ {ts}s", fontsize=9)
        tx.set_axis_off()
        lines = []
        for p, person in enumerate(gt[key]):
            color = np.array(PALETTE[p % len(PALETTE)]) / 255
            x1, y1, x2, y2 = person.box
            ax.add_patch(Rectangle((x1 * w - 0.5, y1 * h - 0.5), (x2 - x1) * w, (y2 - y1) * h, fill=False,
                                   edgecolor=color, linewidth=2))
            best, best_iou = None, 0.5
            for box, scores in dets.get(key, []):
                iou = _iou(box, person.box)
                if iou >= best_iou:
                    best, best_iou = (box, scores), iou
            gt_text = ", ".join(names.get(a, str(a)) for a in sorted(person.labels))
            if best is None:
                pred_text = "no proposal with IoU >= 0.5"
            else:
                bx1, by1, bx2, by2 = best[0]
                ax.add_patch(Rectangle((bx1 * w - 0.5, by1 * h - 0.5), (bx2 - bx1) * w, (by2 - by1) * h,
                                       fill=False, edgecolor=color, linewidth=1, linestyle="--"))
                pred_text = ", ".join(f"{n} {s:.2f}" + (" \u2713" if a in person.labels else "")
                                      for a, n, s in top_actions(best[1], topk, names))
            lines.append((color, f"person {p + 1}  truth: {gt_text}\n      {model_name}: {pred_text}"))
        y = 0.98
        for color, text in lines:
            tx.text(0.0, y, text, color=color * 0.8, fontsize=8, va="top", ha="left", transform=tx.transAxes,
                    wrap=True)
            y -= 0.98 / max(len(lines), 3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    _quantize_png(out_png)
    return keys


def _quantize_png(path: Path) -> None:
    """256-colour palette: figures of rendered frames and text lose nothing visible and shrink 3-4x."""
    from PIL import Image
    with Image.open(path) as im:
        q = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    q.save(path, optimize=True)


def plot_per_class_comparison(runs: dict, path, title: Optional[str] = None, chance: Optional[float] = None) -> None:
    """Per-class AP of several runs as grouped horizontal bars (classes by id), mAPs in the legend.

    Args:
        runs: ``{run name: {"frame_mAP": float, "per_class": {id: ap}, "names": {id: name}}}`` (the entries of
            ``runs/demo/results.json``).
        path: PNG file.
        chance: optional mAP of random scores, drawn as a vertical line.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("plot_per_class_comparison: no runs")
    ids = sorted({int(c) for r in runs.values() for c in r["per_class"]})
    names = {}
    for r in runs.values():
        names.update({int(c): n for c, n in r.get("names", {}).items()})
    k = len(runs)
    height = 0.8 / k
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.32 * len(ids) * max(1, k / 2)))
    for j, (name, r) in enumerate(runs.items()):
        ap = {int(c): v for c, v in r["per_class"].items()}
        ys = np.arange(len(ids)) + (j - (k - 1) / 2) * height
        ax.barh(ys, [ap.get(c, np.nan) for c in ids], height=height, label=f"{name} (mAP {r['frame_mAP']:.3f})",
                color=f"C{j}")
    if chance is not None:
        ax.axvline(chance, color="gray", linestyle=":", label=f"chance (mAP {chance:.3f})")
    ax.set_yticks(range(len(ids)), [f"{c} {names.get(c, '')[:30]}" for c in ids], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AP @ IoU 0.5")
    ax.set_title(title or "per-class frame AP")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def demo_pictures(data_root, run_root, results: dict, head: str = "stssa") -> dict[str, str]:
    """The demo's pictures: ``run_root/keyframes.png`` (``head``'s top actions beside the ground truth on four
    val keyframes; another head if ``head`` was not run) and ``run_root/per_class_ap.png``.

    ``results`` is the demo's results dict (``{head: {"frame_mAP", "per_class", "names", ...}, "chance":
    {...}}``); the detections are read from ``run_root/<head>/detections_epoch<last>.csv``.
    """
    data_root, run_root = Path(data_root), Path(run_root)
    heads = [k for k in results if k != "chance"]
    if not heads:
        raise ValueError("demo_pictures: no trained head in the results")
    shown = head if head in heads else heads[0]
    dets = sorted((run_root / shown).glob("detections_epoch*.csv"),
                  key=lambda p: int(p.stem.rsplit("epoch", 1)[1]))
    if not dets:
        raise FileNotFoundError(f"demo_pictures: no detections_epoch*.csv in {run_root / shown}")
    ann = data_root / "annotations"
    out = {"keyframes": str(run_root / "keyframes.png"), "per_class_ap": str(run_root / "per_class_ap.png")}
    keyframe_figure(data_root / "frames", dets[-1], ann / "ava_val_v2.2.csv", out["keyframes"],
                    labelmap=ann / "ava_action_list_v2.2_for_activitynet_2019.pbtxt",
                    excluded=ann / "ava_val_excluded_timestamps_v2.2.csv", model_name=shown,
                    title=f"{shown} head on synthetic val keyframes: solid = ground truth, dashed = matched proposal")
    plot_per_class_comparison({k: results[k] for k in heads}, out["per_class_ap"],
                              title="per-class frame AP on the synthetic val split",
                              chance=results.get("chance", {}).get("frame_mAP"))
    return out
