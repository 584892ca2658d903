"""AVA frame-mAP, by the official protocol (ActivityNet ``get_ava_performance.py``, AVA v2.2), vectorised.

``python -m stssa.evaluate -l LABELMAP -g GROUNDTRUTH.csv -d DETECTIONS.csv [-e EXCLUDED.csv]
[--json OUT.json] [--plot OUT.png]``, or :func:`evaluate_frame_map` from Python.

Protocol (each step as the official code does it):

1. Rows whose ``action_id`` is not in the label map are dropped, from ground truth and detections alike.
2. Detections: per keyframe ``(video_id, timestamp)`` only the 50 highest-scoring remaining rows are kept.
3. Keyframes listed in the excluded-timestamps file are removed from both sides.
4. Detections with an empty or inverted box (not ``x1 < x2 and y1 < y2``) are dropped (they used a slot
   of the cap in step 2, as in the official code).
5. Every row is one object of its class: a ground-truth person with three actions is three objects, each
   matched only by detections of its own class.
6. Per keyframe and class, detections in descending score order each pick the ground-truth box of that
   class with the highest IoU (on a tie, the first in the official reader's per-keyframe order: its heap of
   ``(1.0, action_id, y1, x1, y2, x2)`` tuples, which is not file order). The detection is a true positive when that IoU is
   ``>= 0.5`` and the box is not taken yet; otherwise it is a false positive (there is no second choice).
   Detections on keyframes without ground truth are false positives.
7. Per class, Pascal VOC all-points AP (precision made monotone from the right, summed over recall steps).
   A class with ground truth but no detections has AP 0. mAP is the mean over the classes that have
   ground truth (the official ``nanmean``).

Ties. The official code orders equal scores by ``np.argsort`` (an unstable quicksort) and a heap, so its
result on score ties is an accident of implementation. Here score ties are broken by input order (earlier
row first), everywhere: in the per-keyframe cap, in matching and in the precision/recall ranking; this is
the stable ``sort(-score)`` of the Pascal VOC devkit. Equal IoUs with two ground-truth boxes are broken as
the official code breaks them (step 6). Results differ from the official script only when scores tie.

Because a detection's choice of ground-truth box (step 6) does not depend on earlier matches, the greedy
matching reduces to "for each ground-truth box, the first detection in score order that chose it with
IoU >= 0.5 is the true positive", which is computed with sorts instead of a Python loop: a million
detection rows take about 10 s on a 2-core CPU, two thirds of it CSV parsing.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from stssa.data.formats import AVAFormatError, _as_labelmap, _fail, _to_numbers, read_csv_columns

__all__ = ["evaluate_frame_map", "write_detections_csv", "rows_from_predictions", "plot_per_class", "main"]

IOU_THRESHOLD = 0.5
MAX_DETECTIONS_PER_KEYFRAME = 50


# ------------------------------------------------------------------------------------------------ input
class _Rows:
    """Columns of a ground-truth or detection table: ``video`` list[str], ``ts`` int64[N], ``box``
    float64[N, 4] (x1, y1, x2, y2), ``cls`` int64[N], ``score`` float64[N], in input order."""

    def __init__(self, video, ts, box, cls, score):
        self.video, self.ts, self.box, self.cls, self.score = video, ts, box, cls, score


def _read_table(src, detections: bool) -> _Rows:
    what = "detections" if detections else "ground truth"
    if isinstance(src, (str, os.PathLike)):
        cols, lines, counts = read_csv_columns(
            src, (7, 8), "columns (video_id,timestamp,x1,y1,x2,y2,action_id,score)" if detections
            else "columns (video_id,timestamp,x1,y1,x2,y2,action_id[,person_id])")
        ts = _to_numbers(src, cols[1], lines, np.int64, "timestamp")
        box = np.stack([_to_numbers(src, cols[j], lines, np.float64, "box coordinate") for j in range(2, 6)], 1) \
            if len(lines) else np.zeros((0, 4))
        cls = _to_numbers(src, cols[6], lines, np.int64, "action_id")
        if detections:
            # The official reader gives 7-column detection rows the score 1.0.
            raw = cols[7]
            if (counts == 7).any():
                raw = [s if n == 8 else "1" for s, n in zip(raw, counts.tolist())]
            score = _to_numbers(src, raw, lines, np.float64, "score")
            bad = ~np.isfinite(score)
            if bad.any():
                raise _fail(src, int(lines[np.flatnonzero(bad)[0]]), "score must be finite")
        else:
            score = np.ones(len(lines))  # the 8th ground-truth column is a person id, not a score
        bad = ~np.isfinite(box).all(axis=1)
        if bad.any():
            raise _fail(src, int(lines[np.flatnonzero(bad)[0]]), "box coordinates must be finite")
        bad = _inverted(box) if not detections else bad
        if bad.any():
            raise _fail(src, int(lines[np.flatnonzero(bad)[0]]), _INVERTED)
        return _Rows(cols[0], ts, box, cls, score)
    # In-memory rows: (video_id, timestamp, x1, y1, x2, y2, action_id[, score or person_id]).
    rows = list(src)
    video, ts, box, cls, score = [], [], [], [], []
    for i, r in enumerate(rows):
        if len(r) not in (7, 8):
            raise ValueError(f"{what} row {i}: expected 7 or 8 fields (video_id, timestamp, x1, y1, x2, y2, "
                             f"action_id{', score' if detections else ''}), got {len(r)}: {r!r}")
        try:
            video.append(str(r[0]))
            ts.append(_timestamp(r[1]))
            box.append([float(r[2]), float(r[3]), float(r[4]), float(r[5])])
            cls.append(int(r[6]))
            score.append(float(r[7]) if detections and len(r) == 8 else 1.0)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what} row {i}: {e}: {r!r}") from None
    box_a = np.array(box, dtype=np.float64).reshape(-1, 4)
    score_a = np.array(score, dtype=np.float64)
    bad = ~(np.isfinite(box_a).all(axis=1) & np.isfinite(score_a))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what} row {i}: box and score must be finite: {rows[i]!r}")
    bad = _inverted(box_a) if not detections else bad
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what} row {i}: {_INVERTED}: {rows[i]!r}")
    return _Rows(video, np.array(ts, dtype=np.int64), box_a, np.array(cls, dtype=np.int64), score_a)


# The official code builds a BoxList of the ground truth, which refuses such a box ("Invalid box data").
_INVERTED = "ground-truth box must satisfy x1 <= x2 and y1 <= y2"


def _inverted(box: np.ndarray) -> np.ndarray:
    return (box[:, 2] < box[:, 0]) | (box[:, 3] < box[:, 1])


def _timestamp(t) -> int:
    """A keyframe second: an integer, or text of one (``"0902"``); ``902.5`` is an error, not 902."""
    if isinstance(t, str):
        return int(t)
    f = float(t)
    if not f.is_integer():
        raise ValueError(f"timestamp must be a whole second, got {t!r}")
    return int(f)


def _read_excluded(src) -> tuple[list[str], np.ndarray]:
    if src is None:
        return [], np.zeros(0, np.int64)
    if isinstance(src, (str, os.PathLike)):
        cols, lines, _ = read_csv_columns(src, (2,), "columns (video_id,timestamp)")
        return cols[0], _to_numbers(src, cols[1], lines, np.int64, "timestamp")
    pairs = list(src)
    out_v, out_t = [], []
    for p in pairs:
        if isinstance(p, str):  # "video_id,0902" keys
            v, t = p.rsplit(",", 1)
        else:
            v, t = p
        out_v.append(str(v))
        try:
            out_t.append(_timestamp(t))
        except (TypeError, ValueError) as e:
            raise ValueError(f"excluded keyframe {p!r}: {e}") from None
    return out_v, np.array(out_t, dtype=np.int64)


def _official_gt_order(key: np.ndarray, action: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Each ground-truth row's position in its keyframe's box list as the official reader builds it: rows
    pushed in file order onto a per-keyframe heap of ``(1.0, action_id, y1, x1, y2, x2)`` and the heap's
    array read as is (its stable sort by score changes nothing, all scores being 1). A detection whose IoU
    ties between two boxes of its class takes the first in this order (``np.argmax``)."""
    heaps: dict[int, list] = {}
    for i, (k, a, (x1, y1, x2, y2)) in enumerate(zip(key.tolist(), action.tolist(), box.tolist())):
        # i breaks no tie heapq would break: equal tuples never swap, and a later push has a larger i
        heapq.heappush(heaps.setdefault(k, []), (1.0, a, y1, x1, y2, x2, i))
    pos = np.empty(len(key), np.int64)
    for h in heaps.values():
        for j, item in enumerate(h):
            pos[item[-1]] = j
    return pos


def _keyframe_codes(videos: list[list[str]], stamps: list[np.ndarray]) -> list[np.ndarray]:
    """One int64 code per (video_id, timestamp), shared across the given tables."""
    vmap = {v: i for i, v in enumerate(dict.fromkeys(v for vs in videos for v in vs))}
    vids = [np.fromiter(map(vmap.__getitem__, vs), np.int64, len(vs)) for vs in videos]
    all_ts = np.concatenate(stamps) if stamps else np.zeros(0, np.int64)
    if all_ts.size == 0:
        return [np.zeros(0, np.int64) for _ in videos]
    lo, span = int(all_ts.min()), int(all_ts.max()) - int(all_ts.min()) + 1
    if span * max(len(vmap), 1) < 2 ** 62:
        return [v * span + (t - lo) for v, t in zip(vids, stamps)]
    pairs = np.concatenate([np.stack([v, t], 1) for v, t in zip(vids, stamps)])
    _, inv = np.unique(pairs, axis=0, return_inverse=True)
    splits = np.cumsum([len(v) for v in vids])[:-1]
    return np.split(inv.reshape(-1).astype(np.int64), splits)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of ``[P, 4]`` box pairs (x1, y1, x2, y2), as ``np_box_ops.iou`` (no +1 pixel)."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def voc_ap(tp: np.ndarray, num_gt: int) -> float:
    """Pascal VOC all-points AP of a ranked list of true(1)/false(0) positives against ``num_gt`` objects.

    As ``compute_precision_recall`` + ``compute_average_precision`` of the official code: precision padded
    with 0 at both ends and made non-increasing from the right, summed over the steps of recall.
    """
    if num_gt <= 0:
        raise ValueError("voc_ap: num_gt must be positive")
    tp = np.asarray(tp, dtype=np.float64)
    ctp = np.cumsum(tp)
    precision = ctp / np.arange(1, len(tp) + 1)
    recall = ctp / num_gt
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


# ----------------------------------------------------------------------------------------------- metric
def evaluate_frame_map(labelmap, groundtruth, detections, excluded=None, *, iou_threshold: float = IOU_THRESHOLD,
                       max_detections_per_keyframe: int | None = MAX_DETECTIONS_PER_KEYFRAME) -> dict:
    """AVA frame-mAP@IoU0.5 (official protocol, see the module docstring).

    Args:
        labelmap: label map path (either pbtxt form), ``{id: name}``, or ``read_labelmap``'s ``(dict, set)``.
            Only these classes are scored.
        groundtruth: CSV path or rows ``(video_id, timestamp, x1, y1, x2, y2, action_id[, person_id])``,
            boxes normalised.
        detections: CSV path or rows ``(video_id, timestamp, x1, y1, x2, y2, action_id, score)``
            (a 7-field row has score 1.0, as in the official reader).
        excluded: excluded-timestamps CSV path, or ``(video_id, timestamp)`` pairs, or ``None``.
        iou_threshold: matching threshold (official: 0.5).
        max_detections_per_keyframe: detections kept per keyframe (official: 50); ``None`` keeps all.

    Returns:
        ``{"mAP": float, "per_class": {id: {"name", "ap", "num_gt", "num_det"}}, "classes_without_gt":
        [id, ...], "num_keyframes": int, "num_detections": int}``. ``per_class`` holds the label-map classes
        with ground truth (the ones averaged into ``mAP``), in id order; ``num_det`` counts the detections
        of the class that were ranked (after the cap, exclusions and invalid-box removal);
        ``classes_without_gt`` lists the other label-map classes; ``num_keyframes`` counts ground-truth
        keyframes scored, ``num_detections`` the detections ranked in total.

    Raises:
        ValueError: no ground truth of a label-map class remains (mAP would be undefined); malformed input
            (an :class:`~stssa.data.formats.AVAFormatError` naming ``file:line`` for files).
    """
    names, ids = _as_labelmap(labelmap)
    class_ids = np.array(sorted(ids), dtype=np.int64)
    nc = len(class_ids)
    gt = _read_table(groundtruth, detections=False)
    det = _read_table(detections, detections=True)
    ex_v, ex_t = _read_excluded(excluded)
    g_key, d_key, e_key = _keyframe_codes([gt.video, det.video, ex_v], [gt.ts, det.ts, ex_t])

    def class_index(cls):
        idx = np.clip(np.searchsorted(class_ids, cls), 0, max(nc - 1, 0))
        return idx, (class_ids[idx] == cls) if nc else np.zeros(len(cls), bool)

    # Ground truth: label-map classes, not excluded.
    g_ci, g_in = class_index(gt.cls)
    g_keep = g_in & ~np.isin(g_key, e_key)
    g_key, g_ci, g_box = g_key[g_keep], g_ci[g_keep], gt.box[g_keep]
    g_pos = _official_gt_order(g_key, gt.cls[g_keep], g_box)
    num_gt = np.bincount(g_ci, minlength=nc)
    if not num_gt.any():
        raise ValueError("evaluate_frame_map: no ground-truth row of a label-map class is left after exclusions; "
                         "mAP is undefined")

    # Detections: label-map classes, then the per-keyframe cap in (score desc, input order).
    d_ci, d_in = class_index(det.cls)
    sel = np.flatnonzero(d_in)
    order = sel[np.lexsort((sel, -det.score[sel], d_key[sel]))]
    if max_detections_per_keyframe is not None and len(order):
        k = d_key[order]
        start = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        rank = np.arange(len(order)) - np.repeat(start, np.diff(np.r_[start, len(order)]))
        order = order[rank < max_detections_per_keyframe]
    order = order[~np.isin(d_key[order], e_key)]
    b = det.box[order]
    order = order[(b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3])]
    # Rank every kept detection once: class, then score desc, then input order. Matching within a
    # (keyframe, class) and the precision/recall ranking of a class both follow this order.
    order = order[np.lexsort((order, -det.score[order], d_ci[order]))]
    dk, dc, dbox, dscore = d_key[order], d_ci[order], det.box[order], det.score[order]
    n_det = len(order)

    # Candidate (detection, gt) pairs: the gt boxes of the same keyframe and class.
    g_group = g_key * nc + g_ci
    g_sort = np.lexsort((g_pos, g_group))  # group, then the official reader's order (argmax tie rule)
    g_group_s = g_group[g_sort]
    d_group = dk * nc + dc
    lo = np.searchsorted(g_group_s, d_group, "left")
    cnt = np.searchsorted(g_group_s, d_group, "right") - lo
    pair_det = np.repeat(np.arange(n_det), cnt)
    first_pair = np.cumsum(cnt) - cnt
    pair_gt = lo[pair_det] + (np.arange(len(pair_det)) - first_pair[pair_det])  # index into g_sort order
    iou = _iou(dbox[pair_det], g_box[g_sort[pair_gt]])
    # Per detection: its best gt (first max in gt order), then keep it if IoU >= threshold.
    has = cnt > 0
    best_iou = np.full(n_det, -1.0)
    if len(iou):
        best_iou[has] = np.maximum.reduceat(iou, first_pair[has])
    is_best = iou == best_iou[pair_det]
    best_pair = np.full(n_det, -1)
    hit_pairs = np.flatnonzero(is_best)
    dets_hit, first = np.unique(pair_det[hit_pairs], return_index=True)
    best_pair[dets_hit] = hit_pairs[first]
    cand = np.flatnonzero(best_iou >= iou_threshold)
    # The first candidate (in ranking order) of each gt box takes it; later ones are false positives.
    tp = np.zeros(n_det, dtype=bool)
    if len(cand):
        chosen_gt = pair_gt[best_pair[cand]]
        o = np.lexsort((cand, chosen_gt))
        firsts = np.r_[True, chosen_gt[o][1:] != chosen_gt[o][:-1]]
        tp[cand[o][firsts]] = True

    # Per-class AP over the ranked detections (contiguous per class by construction).
    bounds = np.searchsorted(dc, np.arange(nc + 1))
    per_class, aps = {}, []
    for ci in range(nc):
        cid = int(class_ids[ci])
        if num_gt[ci] == 0:
            continue
        ap = voc_ap(tp[bounds[ci]:bounds[ci + 1]], int(num_gt[ci]))
        aps.append(ap)
        per_class[cid] = {"name": names.get(cid, str(cid)), "ap": ap, "num_gt": int(num_gt[ci]),
                          "num_det": int(bounds[ci + 1] - bounds[ci])}
    return {
        "mAP": float(np.mean(aps)),
        "per_class": per_class,
        "classes_without_gt": [int(c) for c, n in zip(class_ids, num_gt) if n == 0],
        "num_keyframes": int(len(np.unique(g_key))),
        "num_detections": int(n_det),
    }


# ----------------------------------------------------------------------------------------------- output
def write_detections_csv(path, rows) -> int:
    """Write detections in the official CSV form ``video_id,timestamp,x1,y1,x2,y2,action_id,score``.

    Args:
        path: output file (parent folders are created).
        rows: iterable of ``(video_id, timestamp, x1, y1, x2, y2, action_id, score)`` with normalised boxes;
            numbers may be Python, numpy or 0-d torch values.

    Returns:
        The number of rows written. Timestamps are written as ``%04d`` and boxes with 3 decimals (as the
        AVA files); scores with 6 significant digits, so that rounding creates few ties.
    """
    out = []
    for i, r in enumerate(rows):
        if len(r) != 8:
            raise ValueError(f"write_detections_csv: row {i} must have 8 fields (video_id, timestamp, x1, y1, x2, "
                             f"y2, action_id, score), got {len(r)}")
        v, t, x1, y1, x2, y2, a, s = r
        v = str(v)
        try:
            t = _timestamp(t)
        except (TypeError, ValueError) as e:
            raise ValueError(f"write_detections_csv: row {i}: {e}") from None
        if "," in v or "\n" in v:
            raise ValueError(f"write_detections_csv: row {i}: video_id {v!r} contains a comma or newline")
        s = float(s)
        if not math.isfinite(s):
            raise ValueError(f"write_detections_csv: row {i}: score must be finite, got {s}")
        out.append(f"{v},{int(t):04d},{float(x1):.3f},{float(y1):.3f},{float(x2):.3f},{float(y2):.3f},"
                   f"{int(a)},{s:.6g}\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.writelines(out)
    return len(out)


def rows_from_predictions(meta, scores, class_ids=None, min_score: float = 0.0) -> list[tuple]:
    """Detection rows from model outputs on a batch made by :func:`stssa.data.ava_collate`.

    Args:
        meta: the batch's ``meta``: K tuples ``(video_id, timestamp, norm_box ndarray[4], box_score)``.
        scores: ``[K, C]`` per-class scores (Tensor or ndarray); column ``c`` is action id ``c + 1``.
        class_ids: action ids to emit (default: every column); e.g. the 60 evaluated ids.
        min_score: skip scores below this (the evaluator keeps only 50 rows per keyframe anyway).

    Returns:
        Rows ``(video_id, timestamp, x1, y1, x2, y2, action_id, score)`` for :func:`write_detections_csv` or
        :func:`evaluate_frame_map`.
    """
    s = scores.detach().float().cpu().numpy() if hasattr(scores, "detach") else np.asarray(scores, np.float64)
    if s.ndim != 2 or s.shape[0] != len(meta):
        raise ValueError(f"rows_from_predictions: scores must be [K, C] with K = len(meta) = {len(meta)}, "
                         f"got shape {tuple(s.shape)}")
    ids = np.arange(1, s.shape[1] + 1) if class_ids is None else np.array(sorted(class_ids), dtype=np.int64)
    if len(ids) and (ids.min() < 1 or ids.max() > s.shape[1]):
        raise ValueError(f"rows_from_predictions: class_ids must lie in 1..{s.shape[1]}")
    rows = []
    for (vid, ts, box, _), srow in zip(meta, s):
        x1, y1, x2, y2 = (float(v) for v in box)
        for a in ids.tolist():
            sc = float(srow[a - 1])
            if sc >= min_score:
                rows.append((vid, int(ts), x1, y1, x2, y2, a, sc))
    return rows


def format_table(result: dict) -> str:
    """The per-class table printed by the CLI."""
    lines = [f"frame-mAP@{IOU_THRESHOLD}: {result['mAP']:.4f} over {len(result['per_class'])} classes with "
             f"ground truth ({result['num_keyframes']} keyframes, {result['num_detections']} detections ranked)",
             f"{'id':>4}  {'name':<42} {'AP':>7} {'#gt':>7} {'#det':>8}"]
    for cid, r in result["per_class"].items():
        lines.append(f"{cid:>4}  {r['name'][:42]:<42} {r['ap']:>7.4f} {r['num_gt']:>7d} {r['num_det']:>8d}")
    if result["classes_without_gt"]:
        lines.append(f"label-map classes without ground truth (not averaged): "
                     f"{', '.join(map(str, result['classes_without_gt']))}")
    return "\n".join(lines)


def plot_per_class(result: dict, path, title: str | None = None) -> None:
    """Horizontal bar plot of per-class AP (best first) with the mAP as a line; written to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(result["per_class"].items(), key=lambda kv: kv[1]["ap"])
    labels = [f"{cid} {r['name'][:32]} ({r['num_gt']})" for cid, r in items]
    values = [r["ap"] for _, r in items]
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.22 * len(items)))
    ax.barh(range(len(items)), values, color="tab:blue")
    ax.axvline(result["mAP"], color="tab:red", linestyle="--", label=f"mAP {result['mAP']:.4f}")
    ax.set_yticks(range(len(items)), labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("AP @ IoU 0.5 (class id, name, #gt)")
    ax.set_title(title or "AVA frame-mAP per class")
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stssa.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-l", "--labelmap", required=True, help="label map .pbtxt (either official form)")
    p.add_argument("-g", "--groundtruth", required=True, help="ground-truth CSV")
    p.add_argument("-d", "--detections", required=True, help="detections CSV (video_id,ts,x1,y1,x2,y2,action,score)")
    p.add_argument("-e", "--exclusions", default=None, help="excluded-timestamps CSV")
    p.add_argument("--json", default=None, help="write {'mAP', 'per_class', ...} here")
    p.add_argument("--plot", default=None, help="write a per-class AP bar plot (PNG) here")
    a = p.parse_args(argv)
    try:
        result = evaluate_frame_map(a.labelmap, a.groundtruth, a.detections, a.exclusions)
    except (AVAFormatError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        data = dict(result, per_class={str(k): v for k, v in result["per_class"].items()})
        Path(a.json).write_text(json.dumps(data, indent=2) + "\n")
    if a.plot:
        plot_per_class(result, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
