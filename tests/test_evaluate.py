"""Tests of the AVA frame-mAP evaluator (stssa.evaluate) against hand-computed cases, the official
protocol's corner cases, a plain-Python port of the official algorithm, and the real sample files."""

from __future__ import annotations

import heapq
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from stssa.data.formats import AVAFormatError
from stssa.evaluate import evaluate_frame_map, main, rows_from_predictions, voc_ap, write_detections_csv

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "ava"
LABELMAP60 = SHARED / "ava_action_list_v2.2_for_activitynet_2019.pbtxt"
LABELMAP80 = SHARED / "ava_action_list_v2.2.pbtxt"
SAMPLE_CSV = SHARED / "ava_train_v2.2_sample.csv"
SAMPLE_EXCL = SHARED / "ava_val_excluded_timestamps_sample.csv"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/ava not present")

LM = {12: "stand", 14: "walk", 17: "carry/hold (an object)", 80: "watch (a person)"}
A, B = ("vidA0000000", 902), ("vidB0000000", 903)
BOX1 = (0.1, 0.1, 0.4, 0.9)
BOX2 = (0.6, 0.1, 0.9, 0.9)
FAR = (0.0, 0.0, 0.05, 0.05)  # overlaps nothing above


def gt(key, box, cls, pid=0):
    return (key[0], key[1], *box, cls, pid)


def det(key, box, cls, score):
    return (key[0], key[1], *box, cls, score)


# --------------------------------------------------------------------------------- plain-Python reference
def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_frame_map(class_ids, gt_rows, det_rows, excluded=(), cap=50, thr=0.5):
    """Loop-for-loop port of get_ava_performance.py + the TF object-detection per-image evaluation,
    with score ties ordered by input row (the stable order stssa.evaluate documents)."""
    ids, excluded = set(class_ids), {(v, int(t)) for v, t in excluded}
    heaps = defaultdict(list)  # the official reader: a heap of (score 1.0, action, y1, x1, y2, x2) per keyframe
    for r in gt_rows:
        if int(r[6]) in ids and (r[0], int(r[1])) not in excluded:
            x1, y1, x2, y2 = map(float, r[2:6])
            heapq.heappush(heaps[(r[0], int(r[1]))], (1.0, int(r[6]), y1, x1, y2, x2))
    gts = {k: [(c, (x1, y1, x2, y2)) for _, c, y1, x1, y2, x2 in h] for k, h in heaps.items()}
    dets = defaultdict(list)
    for i, r in enumerate(det_rows):
        if int(r[6]) in ids:
            dets[(r[0], int(r[1]))].append((-float(r[7]), i, int(r[6]), tuple(map(float, r[2:6]))))
    ranked = defaultdict(list)
    for key, lst in dets.items():
        lst = sorted(lst)[:cap]  # the 50 highest scores (heap in the official reader)
        if key in excluded:
            continue
        lst = [d for d in lst if d[3][0] < d[3][2] and d[3][1] < d[3][3]]  # _remove_invalid_boxes
        for c in sorted({d[2] for d in lst}):
            g = [b for gc, b in gts.get(key, []) if gc == c]
            taken = [False] * len(g)
            for d in (d for d in lst if d[2] == c):
                tp = False
                if g:
                    ious = [_iou(d[3], b) for b in g]
                    j = int(np.argmax(ious))
                    if ious[j] >= thr and not taken[j]:
                        taken[j] = tp = True
                ranked[c].append((d[0], d[1], tp))
    num_gt = Counter(c for lst in gts.values() for c, _ in lst)
    aps = {}
    for c, n in num_gt.items():
        tps = [t for _, _, t in sorted(ranked.get(c, []))]
        prec, rec, ctp = [], [], 0
        for k, t in enumerate(tps, 1):
            ctp += t
            prec.append(ctp / k)
            rec.append(ctp / n)
        rec, prec = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
        for i in range(len(prec) - 2, -1, -1):
            prec[i] = max(prec[i], prec[i + 1])
        aps[c] = sum((rec[i] - rec[i - 1]) * prec[i] for i in range(1, len(rec)) if rec[i] != rec[i - 1])
    return sum(aps.values()) / len(aps), aps


def random_case(seed, n_videos=4, n_keyframes=6, classes=(12, 14, 17, 80, 2)):
    """Random GT/detections with overlapping persons, >50 detections on some keyframes, score ties,
    out-of-map classes (2), invalid boxes, detections on keyframes without GT, excluded keyframes."""
    rng = np.random.default_rng(seed)
    gt_rows, det_rows, keys = [], [], []
    for v in range(n_videos):
        for t in range(n_keyframes):
            key = (f"v{seed}_{v:02d}", 902 + t)
            keys.append(key)
            has_gt = rng.random() < 0.8
            for p in range(rng.integers(1, 5) if has_gt else 0):
                x1, y1 = rng.uniform(0, 0.6, 2)
                box = (round(x1, 3), round(y1, 3), round(x1 + rng.uniform(0.1, 0.4), 3),
                       round(y1 + rng.uniform(0.2, 0.4), 3))
                for c in rng.choice(classes, rng.integers(1, 4), replace=False):
                    gt_rows.append(gt(key, box, int(c), p))
                    if rng.random() < 0.05:  # the same object annotated twice
                        gt_rows.append(gt(key, box, int(c), p))
            n_det = int(rng.integers(0, 30)) if rng.random() < 0.8 else 70
            boxes_here = [r[2:6] for r in gt_rows if (r[0], r[1]) == key]
            for _ in range(n_det):
                if boxes_here and rng.random() < 0.7:
                    b = np.array(boxes_here[rng.integers(len(boxes_here))]) + rng.normal(0, 0.04, 4)
                else:
                    x1, y1 = rng.uniform(0, 0.7, 2)
                    b = np.array([x1, y1, x1 + rng.uniform(-0.02, 0.3), y1 + rng.uniform(0.1, 0.3)])
                score = float(rng.choice([0.5, 0.25])) if rng.random() < 0.2 else float(rng.random())
                det_rows.append(det(key, tuple(float(x) for x in b), int(rng.choice(classes)), score))
    excluded = [keys[i] for i in rng.choice(len(keys), 2, replace=False)]
    return gt_rows, det_rows, excluded


# ------------------------------------------------------------------------------------------- hand cases
def test_perfect_detections_score_one():
    g = [gt(A, BOX1, 12), gt(A, BOX1, 17), gt(A, BOX2, 12), gt(B, BOX2, 80)]
    d = [det((r[0], r[1]), r[2:6], r[6], 0.9) for r in g]
    res = evaluate_frame_map(LM, g, d)
    assert res["mAP"] == 1.0
    assert {c: v["ap"] for c, v in res["per_class"].items()} == {12: 1.0, 17: 1.0, 80: 1.0}
    assert res["per_class"][12]["num_gt"] == 2 and res["per_class"][12]["name"] == "stand"
    assert res["classes_without_gt"] == [14]
    assert res["num_keyframes"] == 2


def test_all_wrong_scores_zero():
    g = [gt(A, BOX1, 12), gt(B, BOX2, 80)]
    d = [det(A, BOX2, 12, 0.9), det(A, BOX1, 80, 0.8), det(B, FAR, 80, 0.7)]  # wrong place or wrong class
    assert evaluate_frame_map(LM, g, d)["mAP"] == 0.0


def test_known_partial_case():
    # class 12: 2 GT; ranked TP, FP, TP -> P = 1, 1/2, 2/3 at R = 1/2, 1/2, 1 -> AP = 1/2 + 1/2 * 2/3.
    # class 80: 1 GT, its only detection overlaps with IoU 0.4 -> AP 0.
    g = [gt(A, BOX1, 12), gt(A, BOX2, 12), gt(B, (0.0, 0.0, 0.5, 1.0), 80)]
    d = [det(A, BOX1, 12, 0.9), det(A, FAR, 12, 0.8), det(A, BOX2, 12, 0.7),
         det(B, (0.0, 0.0, 0.2, 1.0), 80, 0.6)]
    res = evaluate_frame_map(LM, g, d)
    assert res["per_class"][12]["ap"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert res["per_class"][80]["ap"] == 0.0
    assert res["mAP"] == pytest.approx((0.5 + 1 / 3 + 0.0) / 2, abs=1e-12)


def test_duplicate_detection_is_false_positive():
    g = [gt(A, BOX1, 12), gt(B, BOX1, 12)]
    # Two hits on A's box: the second is FP. Ranked TP(0.9) FP(0.8) TP(0.7): AP = 1/2 + 1/2 * 2/3.
    d = [det(A, BOX1, 12, 0.9), det(A, BOX1, 12, 0.8), det(B, BOX1, 12, 0.7)]
    assert evaluate_frame_map(LM, g, d)["mAP"] == pytest.approx(0.5 + 1 / 3, abs=1e-12)


def test_no_second_choice():
    # g1 and g2 overlap; both detections overlap g1 most. The second one also has IoU >= 0.5 with g2,
    # but the official protocol does not fall back to it: FP.
    g1, g2 = (0.0, 0.0, 0.4, 1.0), (0.1, 0.0, 0.5, 1.0)
    d1, d2 = (0.0, 0.0, 0.4, 1.0), (0.02, 0.0, 0.42, 1.0)
    assert _iou(d2, g1) > _iou(d2, g2) >= 0.5
    res = evaluate_frame_map(LM, [gt(A, g1, 12), gt(A, g2, 12)], [det(A, d1, 12, 0.9), det(A, d2, 12, 0.8)])
    assert res["mAP"] == pytest.approx(0.5, abs=1e-12)  # TP, FP over 2 GT


def test_iou_threshold_is_inclusive():
    g = [gt(A, (0.0, 0.0, 0.5, 1.0), 12)]
    assert evaluate_frame_map(LM, g, [det(A, (0.0, 0.0, 0.25, 1.0), 12, 0.9)])["mAP"] == 1.0  # IoU = 0.5
    assert evaluate_frame_map(LM, g, [det(A, (0.0, 0.0, 0.2499, 1.0), 12, 0.9)])["mAP"] == 0.0


def test_cap_of_50_per_keyframe():
    g = [gt(A, BOX1, 12)]
    fps = [det(A, FAR, 12, 0.99 - 0.001 * i) for i in range(50)]
    hit = det(A, BOX1, 12, 0.1)
    assert evaluate_frame_map(LM, g, fps + [hit])["mAP"] == 0.0  # the TP is the 51st: dropped
    assert evaluate_frame_map(LM, g, fps + [hit], max_detections_per_keyframe=None)["mAP"] == \
        pytest.approx(1 / 51, abs=1e-12)
    # Rows of classes outside the label map do not take slots of the cap.
    other = [det(A, BOX1, 2, 0.999) for _ in range(10)]
    assert evaluate_frame_map(LM, g, other + fps[:49] + [hit])["mAP"] == pytest.approx(1 / 50, abs=1e-12)
    # The cap is per keyframe: 50 FPs on B leave A's detection alone.
    fps_b = [det(B, FAR, 12, 0.99) for _ in range(50)]
    assert evaluate_frame_map(LM, g, fps_b + [hit])["mAP"] == pytest.approx(1 / 51, abs=1e-12)


def test_exclusions_remove_both_sides():
    g = [gt(A, BOX1, 12), gt(B, BOX1, 12)]
    d = [det(B, FAR, 12, 0.9), det(A, BOX1, 12, 0.5)]  # FP on B ranked first, TP on A
    assert evaluate_frame_map(LM, g, d)["mAP"] == pytest.approx(0.25, abs=1e-12)  # P=1/2 at R=1/2
    assert evaluate_frame_map(LM, g, d, excluded=[B])["mAP"] == 1.0
    assert evaluate_frame_map(LM, g, d, excluded=[f"{B[0]},{B[1]:04d}"])["mAP"] == 1.0
    res = evaluate_frame_map(LM, g, d, excluded=[B])
    assert res["per_class"][12]["num_gt"] == 1 and res["num_detections"] == 1


def test_ties_follow_input_order():
    g = [gt(A, BOX1, 12)]
    tp_first = [det(A, BOX1, 12, 0.5), det(A, FAR, 12, 0.5)]
    assert evaluate_frame_map(LM, g, tp_first)["mAP"] == 1.0
    assert evaluate_frame_map(LM, g, tp_first[::-1])["mAP"] == pytest.approx(0.5, abs=1e-12)
    # Two tied detections of the same box: the earlier row takes it (across keyframes too).
    g2 = [gt(A, BOX1, 12), gt(B, BOX2, 12)]
    d2 = [det(B, FAR, 12, 0.7), det(A, BOX1, 12, 0.7), det(B, BOX2, 12, 0.7)]
    # ranked FP, TP, TP over 2 GT: P = 0, 1/2, 2/3 at R = 0, 1/2, 1 -> AP = 1/2 * 2/3 + 1/2 * 2/3
    assert evaluate_frame_map(LM, g2, d2)["mAP"] == pytest.approx(2 / 3, abs=1e-12)
    # Ties at the cap boundary keep the earlier rows.
    fps = [det(A, FAR, 12, 0.5) for _ in range(49)]
    assert evaluate_frame_map(LM, g, fps + [det(A, BOX1, 12, 0.5), det(A, FAR, 12, 0.5)])["mAP"] == \
        pytest.approx(1 / 50, abs=1e-12)
    assert evaluate_frame_map(LM, g, fps + [det(A, FAR, 12, 0.5), det(A, BOX1, 12, 0.5)])["mAP"] == 0.0


def test_iou_ties_follow_the_official_reader_order():
    """A detection at equal IoU with two ground-truth boxes of its class takes the first in the official
    reader's per-keyframe heap order, not file order: here the second row (smaller y1) sits at the heap's
    root. File order would match the 0.9 detection to the first box and leave the 0.8 one, which repeats
    that box, a false positive (mAP 0.5)."""
    first, second = (0.0, 0.5, 1.0, 1.0), (0.0, 0.25, 1.0, 0.75)
    tie = (0.0, 0.375, 1.0, 0.875)  # IoU 0.6 with both
    g = [gt(A, first, 12), gt(A, second, 12, 1)]
    d = [det(A, tie, 12, 0.9), det(A, first, 12, 0.8)]
    assert evaluate_frame_map(LM, g, d)["mAP"] == 1.0
    assert reference_frame_map(LM, g, d)[0] == 1.0
    # rows of other classes or keyframes between them do not change the order within the class
    g3 = [gt(A, first, 12), gt(B, first, 12), gt(A, BOX2, 14), gt(A, second, 12, 1)]
    assert evaluate_frame_map(LM, g3, d)["per_class"][12]["ap"] == pytest.approx(2 / 3, abs=1e-12)
    assert reference_frame_map(LM, g3, d)[1][12] == pytest.approx(2 / 3, abs=1e-12)


def test_timestamps_must_be_whole_seconds(tmp_path):
    """902.5 is an error everywhere, not keyframe 902 (the CSV reader already refuses '902.5')."""
    from fractions import Fraction

    g, d = [gt(A, BOX1, 12)], [det(A, BOX1, 12, 0.9)]
    for t in (Fraction(902), np.int64(902), 902.0, "0902"):
        assert evaluate_frame_map(LM, [("vidA0000000", t, *BOX1, 12, 0)], d)["mAP"] == 1.0
    with pytest.raises(ValueError, match=r"ground truth row 0: timestamp must be a whole second, got 902\.5"):
        evaluate_frame_map(LM, [("vidA0000000", 902.5, *BOX1, 12, 0)], d)
    with pytest.raises(ValueError, match=r"detections row 0: timestamp must be a whole second, got Fraction"):
        evaluate_frame_map(LM, g, [("vidA0000000", Fraction(1805, 2), *BOX1, 12, 0.9)])
    with pytest.raises(ValueError, match=r"excluded keyframe .*whole second"):
        evaluate_frame_map(LM, g, d, excluded=[("vidA0000000", 902.5)])
    with pytest.raises(ValueError, match=r"write_detections_csv: row 0: timestamp must be a whole second"):
        write_detections_csv(tmp_path / "d.csv", [("v", 902.5, *BOX1, 12, 0.9)])


def test_inverted_ground_truth_box_is_an_error(tmp_path):
    """The official code refuses such a box (its BoxList check); a zero-size one is accepted."""
    d = [det(A, BOX1, 12, 0.9)]
    with pytest.raises(ValueError, match=r"ground truth row 1: ground-truth box must satisfy x1 <= x2"):
        evaluate_frame_map(LM, [gt(A, BOX1, 12), gt(A, (0.5, 0.1, 0.1, 0.5), 12)], d)
    f = tmp_path / "gt.csv"
    f.write_text("vidA0000000,0902,0.1,0.1,0.4,0.9,12,0\nvidA0000000,0902,0.1,0.5,0.4,0.2,12,1\n")
    with pytest.raises(AVAFormatError, match=r"gt\.csv:2: ground-truth box must satisfy"):
        evaluate_frame_map(LM, f, d)
    res = evaluate_frame_map(LM, [gt(A, BOX1, 12), gt(A, (0.5, 0.1, 0.5, 0.5), 12, 1)], d)
    assert res["per_class"][12]["num_gt"] == 2 and res["mAP"] == pytest.approx(0.5, abs=1e-12)


def test_classes_without_gt_and_outside_labelmap():
    g = [gt(A, BOX1, 12), gt(A, BOX2, 2)]  # class 2 is not in the label map
    d = [det(A, BOX1, 12, 0.5), det(A, BOX2, 14, 0.9), det(A, BOX2, 2, 0.9), det(A, FAR, 99, 0.99)]
    res = evaluate_frame_map(LM, g, d)
    assert res["mAP"] == 1.0 and list(res["per_class"]) == [12]
    assert res["classes_without_gt"] == [14, 17, 80]
    with pytest.raises(ValueError, match="no ground-truth"):
        evaluate_frame_map(LM, [gt(A, BOX1, 2)], d)


def test_detections_on_keyframes_without_gt_are_false_positives():
    g = [gt(A, BOX1, 12)]
    d = [det(B, BOX1, 12, 0.9), det(A, BOX1, 12, 0.5)]
    assert evaluate_frame_map(LM, g, d)["mAP"] == pytest.approx(0.5, abs=1e-12)


def test_invalid_boxes_are_dropped_not_false_positives():
    g = [gt(A, BOX1, 12)]
    d = [det(A, (0.5, 0.1, 0.5, 0.9), 12, 0.9), det(A, (0.6, 0.1, 0.4, 0.9), 12, 0.8), det(A, BOX1, 12, 0.5)]
    res = evaluate_frame_map(LM, g, d)
    assert res["mAP"] == 1.0 and res["num_detections"] == 1


def test_timestamp_forms_and_duplicate_gt_rows():
    g = [("v", "0902", *BOX1, 12, 0)]
    assert evaluate_frame_map(LM, g, [("v", 902, *BOX1, 12, 0.3)])["mAP"] == 1.0
    # The same GT row twice is two objects; argmax picks the first, so only one can ever be matched.
    g2 = [gt(A, BOX1, 12), gt(A, BOX1, 12)]
    res = evaluate_frame_map(LM, g2, [det(A, BOX1, 12, 0.9), det(A, BOX1, 12, 0.8)])
    assert res["per_class"][12]["num_gt"] == 2 and res["mAP"] == pytest.approx(0.5, abs=1e-12)


def test_no_detections_gives_zero():
    res = evaluate_frame_map(LM, [gt(A, BOX1, 12)], [])
    assert res["mAP"] == 0.0 and res["num_detections"] == 0


def test_voc_ap_hand_values():
    assert voc_ap([1, 0, 1], 2) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc_ap([0, 1], 1) == pytest.approx(0.5)
    assert voc_ap([], 3) == 0.0
    assert voc_ap([1, 1], 4) == pytest.approx(0.5)  # recall never reaches 1


@pytest.mark.parametrize("seed", range(6))
def test_matches_plain_python_port_of_official_code(seed):
    g, d, excl = random_case(seed)
    ids = (12, 14, 17, 80)
    want_map, want = reference_frame_map(ids, g, d, excl)
    res = evaluate_frame_map({i: str(i) for i in ids}, g, d, excl)
    assert set(res["per_class"]) == set(want)
    for c, ap in want.items():
        assert res["per_class"][c]["ap"] == pytest.approx(ap, abs=1e-12), c
    assert res["mAP"] == pytest.approx(want_map, abs=1e-12)
    assert 0.0 < res["mAP"] < 1.0  # a non-trivial case


# ---------------------------------------------------------------------------------- files and the CLI
@needs_shared
def test_real_sample_files():
    res = evaluate_frame_map(LABELMAP60, SAMPLE_CSV, SAMPLE_CSV, SAMPLE_EXCL)  # 8th GT column read as score
    assert res["mAP"] == 1.0
    assert {c: v["num_gt"] for c, v in res["per_class"].items()} == {12: 2, 17: 1, 74: 1, 79: 1, 80: 1}
    assert len(res["classes_without_gt"]) == 55
    # Detections for one keyframe only: 12 finds 1 of 2, 17 and 79 all, 74 and 80 nothing.
    rows = [line.split(",") for line in SAMPLE_CSV.read_text().splitlines()]
    d = [(r[0], r[1], *map(float, r[2:6]), int(r[6]), 0.9) for r in rows if r[0] == "0f39OWEqJ24" and r[1] == "0902"]
    res = evaluate_frame_map(LABELMAP80, SAMPLE_CSV, d, SAMPLE_EXCL)
    assert {c: v["ap"] for c, v in res["per_class"].items()} == {12: 0.5, 17: 1.0, 74: 0.0, 79: 1.0, 80: 0.0}
    assert res["mAP"] == pytest.approx(0.5)
    # Without exclusions 0f39OWEqJ24,0903 adds GT for 12 and 17.
    res = evaluate_frame_map(LABELMAP80, SAMPLE_CSV, d)
    assert res["per_class"][12]["num_gt"] == 3 and res["per_class"][17]["ap"] == pytest.approx(0.5)


def test_write_detections_csv_round_trip(tmp_path):
    g, d, excl = random_case(7)
    d = [(r[0], r[1], *(round(x, 3) for x in r[2:6]), r[6], r[7]) for r in d]
    path = tmp_path / "sub" / "det.csv"
    assert write_detections_csv(path, d) == len(d)
    first = path.read_text().splitlines()[0].split(",")
    assert len(first) == 8 and len(first[1]) == 4
    ids = {12: "a", 14: "b", 17: "c", 80: "d"}
    assert evaluate_frame_map(ids, g, path, excl)["mAP"] == pytest.approx(evaluate_frame_map(ids, g, d, excl)["mAP"],
                                                                         abs=1e-9)
    with pytest.raises(ValueError, match="8 fields"):
        write_detections_csv(tmp_path / "x.csv", [("v", 902, 0, 0, 1, 1, 12)])


def test_rows_from_predictions():
    meta = [("v", 902, np.array([0.1, 0.2, 0.3, 0.4], np.float32), 0.9), ("w", 903, np.zeros(4), 1.0)]
    scores = np.zeros((2, 80))
    scores[0, 11], scores[1, 79] = 0.7, 0.2
    rows = rows_from_predictions(meta, scores, class_ids=[12, 80])
    assert len(rows) == 4 and rows[0][:2] == ("v", 902) and rows[0][6:] == (12, 0.7)
    assert rows[0][2:6] == pytest.approx((0.1, 0.2, 0.3, 0.4))
    assert rows_from_predictions(meta, scores, min_score=0.5) == [rows[0]]
    with pytest.raises(ValueError, match="K = len"):
        rows_from_predictions(meta, scores[:1])


def test_malformed_csv_rows_name_file_and_line(tmp_path):
    good = "v,0902,0.1,0.1,0.4,0.9,12,0.5\n"
    bad = tmp_path / "det.csv"
    bad.write_text(good + "\n" + good + "v,0902,0.1,0.1,0.4,0.9\n")
    with pytest.raises(AVAFormatError, match=r"det\.csv:4: expected 7 or 8"):
        evaluate_frame_map(LM, [gt(("v", 902), BOX1, 12)], bad)
    bad.write_text(good + "v,0902,0.1,0.1,0.4,0.9,12,high\n")
    with pytest.raises(AVAFormatError, match=r"det\.csv:2: score must be a number"):
        evaluate_frame_map(LM, [gt(("v", 902), BOX1, 12)], bad)
    bad.write_text(good + "v,09x2,0.1,0.1,0.4,0.9,12,0.5\n")
    with pytest.raises(AVAFormatError, match=r"det\.csv:2: timestamp must be an integer"):
        evaluate_frame_map(LM, [gt(("v", 902), BOX1, 12)], bad)
    with pytest.raises(ValueError, match="row 0: expected 7 or 8"):
        evaluate_frame_map(LM, [gt(("v", 902), BOX1, 12)], [("v", 902, 0.1)])


@needs_shared
def test_cli_prints_table_and_writes_json_and_plot(tmp_path, capsys):
    det_path = tmp_path / "det.csv"
    rows = [line.split(",") for line in SAMPLE_CSV.read_text().splitlines()]
    write_detections_csv(det_path, [(r[0], r[1], *map(float, r[2:6]), int(r[6]), 0.8) for r in rows if r[1] == "0902"])
    out = subprocess.run([sys.executable, "-m", "stssa.evaluate", "-l", str(LABELMAP60), "-g", str(SAMPLE_CSV),
                          "-d", str(det_path), "-e", str(SAMPLE_EXCL), "--json", str(tmp_path / "r.json"),
                          "--plot", str(tmp_path / "r.png")],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "frame-mAP@0.5: 1.0000" in out.stdout and "carry/hold (an object)" in out.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["mAP"] == 1.0 and data["per_class"]["12"] == {"name": "stand", "ap": 1.0, "num_gt": 2, "num_det": 2}
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Errors: exit status 2 and the message, without a traceback.
    assert main(["-l", str(LABELMAP60), "-g", str(SAMPLE_CSV), "-d", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err


def _big_case(tmp_path, n_det):
    """Files with ``n_det`` detection rows (~100 per keyframe, 3 GT persons per keyframe). Blocks of 100k
    rows are repeated under other video names, which keeps writing the files cheap."""
    rng = np.random.default_rng(0)
    n_base = min(n_det, 100_000)
    n_kf = n_base // 100
    vids = np.array([f"vid{v:08d}" for v in range(64)])
    kv, kt = vids[rng.integers(0, 64, n_kf)], rng.integers(902, 1799, n_kf)
    classes = np.array(sorted(LM))
    g_lines = []
    for i in range(n_kf):
        boxes = rng.uniform(0, 0.5, (3, 2))
        boxes = np.concatenate([boxes, boxes + rng.uniform(0.1, 0.5, (3, 2))], 1).round(3)
        for b in boxes:
            g_lines.append(f"{kv[i]},{kt[i]:04d},{b[0]:.3f},{b[1]:.3f},{b[2]:.3f},{b[3]:.3f},{rng.choice(classes)},0")
    kid = rng.integers(0, n_kf, n_base)
    b = rng.uniform(0, 0.5, (n_base, 2))
    b = np.concatenate([b, b + rng.uniform(0.1, 0.5, (n_base, 2))], 1)
    cls = rng.choice(np.r_[classes, 2], n_base)
    sc = rng.random(n_base)
    d_lines = [f"{kv[k]},{kt[k]:04d},{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f},{c},{s:.6f}"
               for k, (x1, y1, x2, y2), c, s in zip(kid.tolist(), b.tolist(), cls.tolist(), sc.tolist())]
    g_text, d_text = "\n".join(g_lines) + "\n", "\n".join(d_lines) + "\n"
    copies = range(n_det // n_base)
    (tmp_path / "gt.csv").write_text("".join(g_text.replace("vid", f"v{j:02d}") for j in copies))
    (tmp_path / "det.csv").write_text("".join(d_text.replace("vid", f"v{j:02d}") for j in copies))
    return tmp_path / "gt.csv", tmp_path / "det.csv"


def test_speed_100k_rows(tmp_path):
    g, d = _big_case(tmp_path, 100_000)
    t = time.perf_counter()
    res = evaluate_frame_map(LM, g, d)
    assert time.perf_counter() - t < 20  # ~0.5 s on a 2-core CPU; a Python loop per row would take minutes
    assert 0 <= res["mAP"] <= 1


@pytest.mark.slow
def test_speed_one_million_rows(tmp_path):
    g, d = _big_case(tmp_path, 1_000_000)
    t = time.perf_counter()
    res = evaluate_frame_map(LM, g, d)
    elapsed = time.perf_counter() - t
    print(f"1M detection rows: {elapsed:.1f} s")
    assert elapsed < 60 and 0 <= res["mAP"] <= 1
    assert res["num_detections"] > 400_000 and res["num_keyframes"] > 9_000
