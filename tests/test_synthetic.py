"""Tests of the synthetic AVA-format dataset (stssa.data.synthetic): layout and formats, determinism,
that each label is backed by its visual cue (and the temporal ones only by change over time), proposals,
the CLI, and that the files go through the readers and the evaluator."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stssa.data.formats import read_annotations, read_exclusions, read_labelmap, read_proposals
from stssa.data.labels import AVA_EVAL_IDS, labelmap_pbtxt
from stssa.data.synthetic import (ACTION_CUES, APPEARANCE_ACTIONS, FPS, SIGNAL_EVENTS, SYNTHETIC_ACTIONS,
                                  TEMPORAL_ACTIONS, make_dataset, simulate_video)
from stssa.evaluate import evaluate_frame_map

REPO = Path(__file__).resolve().parents[1]
LOCOMOTION = {12, 14, 10, 7, 6, 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("syn"), videos=3, seconds=6, seed=5, height=48, width=64)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_and_formats(tiny):
    frames = Path(tiny["frames"])
    info = json.loads(Path(tiny["info"]).read_text())
    vids = info["videos"]["train"] + info["videos"]["val"]
    assert len(vids) == 3 and len(info["videos"]["val"]) == 1
    assert sorted(p.name for p in frames.iterdir()) == sorted(vids)
    for v in vids:
        files = sorted((frames / v).iterdir())
        assert len(files) == (6 + 3) * FPS == info["frames_per_video"]
        assert files[0].name == f"{v}_000001.jpg" and files[-1].name == f"{v}_{len(files):06d}.jpg"
    assert Path(tiny["labelmap"]).read_text() == labelmap_pbtxt("label")
    assert Path(tiny["labelmap_eval"]).read_text() == labelmap_pbtxt("item")
    names, ids = read_labelmap(tiny["labelmap_eval"])
    train = read_annotations(tiny["train_csv"])
    val = read_annotations(tiny["val_csv"])
    excluded = read_exclusions(tiny["excluded_csv"])
    assert {v for v, _ in train} == set(info["videos"]["train"]) and {v for v, _ in val} <= set(info["videos"]["val"])
    assert {t for _, t in train} == set(range(902, 908))
    assert excluded and excluded.isdisjoint(val) and {v for v, _ in excluded} <= set(info["videos"]["val"])
    boxes = [b for d in (train, val) for bs in d.values() for b in bs]
    labels = {a for b in boxes for a in b.labels}
    assert labels <= set(SYNTHETIC_ACTIONS) <= ids  # all scored by the 60-class evaluation
    assert all(len(set(b.labels) & LOCOMOTION) == 1 for b in boxes)  # one motion state each
    assert np.mean([len(b.labels) for b in boxes]) > 1.5  # several actions per person
    assert all(0 <= c <= 1 for b in boxes for c in b.box)
    # Proposals: every keyframe of the split (excluded ones too), pickle and CSV agree.
    for split, gt in (("train", train), ("val", val)):
        pkl = read_proposals(tiny[f"{split}_proposals_pkl"])
        csv = read_proposals(tiny[f"{split}_proposals_csv"])
        assert set(pkl) >= set(gt) and set(pkl) == set(csv)
        for k in pkl:
            np.testing.assert_allclose(csv[k], pkl[k], atol=6e-4)
    assert excluded <= set(read_proposals(tiny["val_proposals_pkl"]))
    with open(tiny["val_proposals_pkl"], "rb") as f:
        raw = pickle.load(f)
    assert all(k.count(",") == 1 and len(k.split(",")[1]) == 4 for k in raw)


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(videos=2, seconds=1, height=16, width=24)
    a = make_dataset(tmp_path / "a", seed=1, **kw)
    b = make_dataset(tmp_path / "b", seed=1, **kw)
    c = make_dataset(tmp_path / "c", seed=2, **kw)
    assert _digest(Path(a["root"])) == _digest(Path(b["root"]))
    assert Path(a["train_csv"]).read_text() != Path(c["train_csv"]).read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        make_dataset(tmp_path / "a", seed=1, **kw)
    make_dataset(tmp_path / "a", seed=1, overwrite=True, **kw)
    assert _digest(Path(a["root"])) == _digest(Path(b["root"]))


def _window(f, half=8):
    return slice(f - half, f + half + 1)


def test_every_label_is_backed_by_its_cue():
    width, height, seconds = 128, 96, 6
    seen = set()
    for seed in range(25):
        sim = simulate_video(np.random.default_rng([seed, 0]), seconds, height, width)
        persons = sim["persons"]
        for k in range(seconds):
            f = (2 + k) * FPS
            w = _window(f)
            for pi, (p, labs) in enumerate(zip(persons, sim["labels"][k])):
                labs = set(labs)
                seen |= labs
                assert len(labs & LOCOMOTION) == 1
                dx = np.abs(np.diff(p["x"][w]))
                dh = np.diff(p["h"][w])
                moving_y = np.ptp(p["y2"][w])
                if 14 in labs or 10 in labs:
                    lo, hi = (0.005, 0.008) if 14 in labs else (0.014, 0.020)
                    assert lo * width - 1e-9 <= np.median(dx) <= hi * width + 1e-9
                    assert moving_y == 0 and not dh.any()
                elif 64 in labs:  # fight: oscillation towards the partner, feet still
                    assert 12 in labs and np.ptp(p["x"][w]) > 0.05 * p["w0"] and moving_y == 0
                    q = persons[p["inter"][k][2]]
                    assert 64 in sim["labels"][k][persons.index(q)]
                else:
                    assert not dx.any()
                if 7 in labs:
                    assert moving_y > 0.1 * p["h0"]
                elif 14 not in labs and 10 not in labs:
                    assert moving_y == 0
                if 6 in labs or 1 in labs:
                    assert (dh > 0).all() if 6 in labs else (dh < 0).all()
                    # Same height at the keyframe either way: only the direction of change tells them apart.
                    assert p["h"][f] == pytest.approx(0.8 * p["h0"])
                else:
                    assert not dh.any()
                assert (np.ptp(p["hand_v"][w]) > 0.1) == (69 in labs)
                assert (np.ptp(p["head"][w]) > 0) == (79 in labs)
                if 74 in labs:
                    assert 79 in sim["labels"][k][p["inter"][k][2]]
                assert (17 in labs) == (p["obj"][f] in (1, 2)) and (48 in labs) == (p["obj"][f] == 2)
                x1, y1, x2, y2 = sim["boxes"][k][pi]
                assert (x2 - x1, y2 - y1) == pytest.approx((p["w"][f], p["h"][f]), abs=1e-6) or \
                    x1 == 0 or y1 == 0 or x2 == width or y2 == height
    assert seen == set(SYNTHETIC_ACTIONS)
    assert set(TEMPORAL_ACTIONS) | set(APPEARANCE_ACTIONS) == set(SYNTHETIC_ACTIONS)
    assert set(SYNTHETIC_ACTIONS) <= set(AVA_EVAL_IDS)


def test_order_count_duration_and_in_box_interaction_cues():
    """The signal patch shows exactly its class's events around the keyframe (none without a signal
    label); open/close show the same colours for the same time, only in the other order; hand clap and hit
    have the same on-time; give/take hold the object before / after the keyframe, partner of each other."""
    width, height, seconds = 128, 96, 6
    seen = set()
    offsets = np.arange(-15, 15)
    for seed in range(25):
        sim = simulate_video(np.random.default_rng([seed, 0]), seconds, height, width)
        persons = sim["persons"]
        for k in range(seconds):
            f0 = (2 + k) * FPS
            for pi, (p, labs) in enumerate(zip(persons, sim["labels"][k])):
                labs = set(labs)
                sig = p["sig"][f0 + offsets]
                signals = labs & set(SIGNAL_EVENTS)
                assert len(signals) <= 1
                if not signals:
                    assert not sig.any()
                else:
                    (a,) = signals
                    seen.add(a)
                    want = np.zeros_like(sig)
                    for colour, r0, r1 in SIGNAL_EVENTS[a]:
                        want[(offsets >= r0) & (offsets < r1)] = colour
                    np.testing.assert_array_equal(sig, want)
                gift = p["gift"][f0 + offsets]
                if 65 in labs or 78 in labs:
                    seen |= labs & {65, 78}
                    partner = p["inter"][k][2]
                    assert ({65, 78} - labs) <= set(sim["labels"][k][partner])
                    held = gift != 0
                    np.testing.assert_array_equal(held, offsets < -4 if 65 in labs else offsets >= 4)
                    # Shown on the partner's side of the own box, which stays the person's box.
                    assert abs(gift[held]).max() == 1
                else:
                    assert not gift.any()
    assert seen == set(SIGNAL_EVENTS) | {65, 78}

    def colour_time(a):
        return sorted((tuple(c), r1 - r0) for c, r0, r1 in SIGNAL_EVENTS[a])
    assert colour_time(38) == colour_time(22) and SIGNAL_EVENTS[38] != SIGNAL_EVENTS[22]
    assert sum(r1 - r0 for _, r0, r1 in SIGNAL_EVENTS[67]) == sum(r1 - r0 for _, r0, r1 in SIGNAL_EVENTS[34])
    assert len(SIGNAL_EVENTS[67]) == 3 and len(SIGNAL_EVENTS[34]) == 1
    assert set(ACTION_CUES) == set(SYNTHETIC_ACTIONS)
    assert {ACTION_CUES[a] for a in (38, 22)} == {"order"} and ACTION_CUES[74].endswith("(outside box)")
    assert ACTION_CUES[65].startswith("interaction (in box") and set(APPEARANCE_ACTIONS) == {17, 48}


def test_proposals_look_like_a_detector(tiny):
    gt = read_annotations(tiny["train_csv"])
    props = read_proposals(tiny["train_proposals_pkl"])
    best = []
    for key, boxes in gt.items():
        p = props[key]
        assert ((p[:, 4] > 0) & (p[:, 4] < 1)).all() and (np.diff(p[:, 4]) <= 0).all()
        for b in boxes:
            ious = [_iou(b.box, q[:4]) for q in p]
            best.append(max(ious, default=0.0))
    best = np.array(best)
    assert (best >= 0.5).mean() > 0.85 and (best < 0.98).mean() > 0.5  # found, but not pixel-exact


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih)


def test_files_go_through_the_evaluator(tiny):
    # Ground truth as detections: 1.0. Proposals carrying the labels of their GT box: high but below 1
    # (missed persons, jittered boxes, and false positives carrying no label are simply not emitted).
    lm, val, excl = tiny["labelmap_eval"], tiny["val_csv"], tiny["excluded_csv"]
    assert evaluate_frame_map(lm, val, val, excl)["mAP"] == 1.0
    gt = read_annotations(val)
    props = read_proposals(tiny["val_proposals_pkl"], 0.5)
    rows = []
    for key, p in props.items():
        for q in p:
            for b in gt.get(key, []):
                if _iou(b.box, q[:4]) >= 0.5:
                    rows += [(key[0], key[1], *q[:4].tolist(), a, float(q[4])) for a in b.labels]
    res = evaluate_frame_map(lm, val, rows, excl)
    assert 0.6 < res["mAP"] <= 1.0


def test_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "stssa.data.synthetic", "--out", str(tmp_path / "d"), "--videos", "2",
           "--seconds", "1", "--height", "16", "--width", "16", "--seed", "4", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    assert "wrote 2 videos x 1 keyframes" in out.stdout and "train_csv" in out.stdout
    assert len(list((tmp_path / "d" / "frames").rglob("*.jpg"))) == 2 * 4 * FPS
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert again.returncode != 0 and "overwrite" in again.stderr


@pytest.mark.parametrize("args, match", [(["--videos", "1"], "need --videos >= 2"), (["--seconds", "0"], "--seconds >= 1"),
                                         (["--height", "8"], "--height and --width >= 16"),
                                         (["--height", "17", "--videos-format", "mp4"], "even --height")])
def test_cli_argument_errors(tmp_path, capsys, args, match):
    from stssa.data.synthetic import main
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o"), "--quiet", *args])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_cli_existing_set_and_overwrite(tmp_path, capsys):
    """Writing into an existing set without --overwrite is one error line (exit 2); --overwrite replaces
    frames, videos and the info file (written last, so an interrupted run leaves none); a file as --out
    is an error; at least one video stays in train whatever val_fraction."""
    from stssa.data.synthetic import main
    out = tmp_path / "o"
    small = ["--videos", "2", "--seconds", "1", "--height", "16", "--width", "16", "--quiet"]
    assert main(["--out", str(out), "--videos-format", "mp4", *small]) == 0
    assert main(["--out", str(out), *small]) == 2
    assert "not empty; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main(["--out", str(out), "--overwrite", *small]) == 0
    assert not (out / "videos").exists()  # the first set's MP4s went with its frames
    assert json.loads((out / "synthetic_info.json").read_text())["generator"] == "stssa.data.synthetic"
    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file"), *small]) == 2
    paths = make_dataset(tmp_path / "v", videos=2, seconds=1, height=16, width=16, val_fraction=0.9)
    info = json.loads(Path(paths["info"]).read_text())
    assert len(info["videos"]["train"]) == 1 and len(info["videos"]["val"]) == 1
