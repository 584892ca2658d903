"""Tests of the inference CLI (python -m stssa.infer) and the pictures (stssa.visualize).

The end-to-end test runs offline on a tiny synthetic set, every step through its public entry point:
synthetic MP4s -> ``python -m stssa.data.frames`` -> ``stssa.train`` -> ``python -m stssa.evaluate`` ->
``python -m stssa.infer`` on the val videos -> the evaluator reads its CSV -> pictures. Clip timing is checked
exactly on a video whose frames encode their index; boxes files, the person detector's local-weights rule
and per-video errors are checked on their own."""
from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stssa.data.ava import AVA_MEAN, AVA_STD, clip_frame_indices
from stssa.data.video import probe_video, resampled_frames, write_video
from stssa.infer import (PersonDetectorUnavailable, TorchvisionPersonDetector, find_detector_weights,
                         infer_video, main as infer_main, read_person_boxes)
from stssa.visualize import draw_detections, keyframe_figure, plot_per_class_comparison, vis_scale
from test_video import code_frame, read_code, write_with_pts


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(root: Path, frames: Path) -> dict:
    return {
        "name": "infer_tiny",
        "model": {"backbone": {"depths": [1, 1, 1, 1], "width": 4, "expansion": 2},
                  "head": {"type": "stssa", "axes": ["spatial", "temporal"], "num_layers": 1, "embed_dim": 8,
                           "slow_kernel": 3, "layernorm": True, "dropout": 0.3},
                  "num_classes": 80, "use_fused": True},
        "data": {"root": str(root), "frames": str(frames),
                 "labelmap": "annotations/ava_action_list_v2.2_for_activitynet_2019.pbtxt",
                 "train_csv": "annotations/ava_train_v2.2.csv", "val_csv": "annotations/ava_val_v2.2.csv",
                 "exclusions": "annotations/ava_val_excluded_timestamps_v2.2.csv",
                 "val_proposals": "annotations/ava_dense_proposals_val.pkl", "proposal_threshold": 0.5,
                 "num_frames": 4, "sampling_rate": 4, "crop_size": 32, "jitter_scales": [32, 40]},
        "train": {"epochs": 2, "batch_size": 2, "lr": 0.05, "warmup_steps": 2, "ckpt_every": 0, "eval_every": 2,
                  "num_workers": 0, "threads": 1, "seed": 5},
    }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """video -> frames -> train -> evaluate -> infer, each through its CLI / public entry point."""
    from stssa.data.frames import main as frames_main
    from stssa.data.synthetic import make_dataset
    from stssa.train import Trainer
    tmp = tmp_path_factory.mktemp("e2e")
    paths = make_dataset(tmp / "syn", videos=4, seconds=3, seed=3, height=48, width=64, val_fraction=0.25,
                         videos_format="mp4")
    frames = tmp / "frames"
    assert frames_main(["--videos", paths["videos"], "--out", str(frames), "--quiet"]) == 0
    trainer = Trainer(_config(tmp / "syn", frames), tmp / "run", device="cpu", quiet=True)
    train_result = trainer.fit()
    val_videos = json.loads(Path(paths["info"]).read_text())["videos"]["val"]
    out = tmp / "infer"
    rc = infer_main(["--checkpoint", str(tmp / "run" / "checkpoint.pt"),
                     "--video", *[str(Path(paths["videos"]) / f"{v}.mp4") for v in val_videos],
                     "--boxes", paths["val_proposals_pkl"], "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    return {"paths": paths, "frames": frames, "run": tmp / "run", "out": out, "val_videos": val_videos,
            "train_result": train_result, "tmp": tmp}


def test_end_to_end_video_to_pictures(pipeline, capsys):
    from stssa.evaluate import main as evaluate_main
    p, out = pipeline["paths"], pipeline["out"]
    js = out / "eval.json"
    assert evaluate_main(["-l", p["labelmap_eval"], "-g", p["val_csv"], "-d", str(out / "detections.csv"),
                          "-e", p["excluded_csv"], "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["num_keyframes"] > 0 and res["num_detections"] > 0 and 0 <= res["mAP"] <= 1
    # The same checkpoint, boxes and keyframes as the training run's evaluation; only the frames differ (MP4
    # decoded directly vs the JPEGs extracted from it), so every score agrees closely.
    ours = {tuple(r.split(",")[:7]): float(r.split(",")[7]) for r in (out / "detections.csv").read_text().split()}
    train_csv = pipeline["run"] / "detections_epoch2.csv"
    theirs = {tuple(r.split(",")[:7]): float(r.split(",")[7]) for r in train_csv.read_text().split()}
    assert set(ours) == set(theirs)
    diff = max(abs(ours[k] - theirs[k]) for k in ours)
    print(f"infer vs training-eval scores: max |diff| {diff:.3g}; mAP {res['mAP']:.4f} vs "
          f"{pipeline['train_result']['mAP']:.4f}")
    # measured 0.018 (the frames differ by a JPEG re-encoding); the mAP of so few keyframes moves more
    assert diff < 0.03, diff

    # Pictures: one per keyframe of each val video, and the annotated videos.
    for v in pipeline["val_videos"]:
        video = Path(p["videos"]) / f"{v}.mp4"
        info = probe_video(video)
        n_kf = int(info.duration)
        pics = sorted((out / "frames").glob(f"{v}_*.jpg"))
        assert [q.name for q in pics] == [f"{v}_{900 + s:04d}.jpg" for s in range(n_kf)]
        ann = probe_video(out / f"{v}_annotated.mp4")
        scale = vis_scale(48, 64)
        assert (ann.width, ann.height) == (64 * scale, 48 * scale) and ann.start == 900.0
        assert abs(ann.duration - info.duration) < 0.05
    # An annotated keyframe differs from the raw frame on its boxes' outlines and nowhere much else.
    v = pipeline["val_videos"][0]
    boxes = read_person_boxes(p["val_proposals_pkl"], v, 0.5)[902]
    raw = next(f for i, t, f in resampled_frames(Path(p["videos"]) / f"{v}.mp4", 30) if t == 902)
    raw = np.repeat(np.repeat(raw, scale, 0), scale, 1).astype(np.float64)
    pic = np.asarray(Image.open(out / "frames" / f"{v}_0902.jpg"), np.float64)
    diff = np.abs(pic - raw).max(axis=2)
    hh, ww = diff.shape
    for x1, y1, x2, y2, _ in boxes:
        c1, r1, c2, r2 = int(x1 * ww), int(y1 * hh), int(x2 * ww), int(y2 * hh)
        lower = slice(r1 + (r2 - r1) // 2, r2)  # the lower half of the box's left edge: no caption there
        assert diff[lower, c1:c1 + 2].mean() > 40
    assert (diff < 25).mean() > 0.5  # JPEG noise only, over most of the frame


def test_pictures_of_the_demo_kind(pipeline):
    p, run = pipeline["paths"], pipeline["run"]
    png = run / "keyframes.png"
    keys = keyframe_figure(pipeline["frames"], run / "detections_epoch2.csv", p["val_csv"], png,
                           labelmap=p["labelmap_eval"], excluded=p["excluded_csv"], num_keyframes=2)
    assert len(keys) == 2 and all(k[0] in pipeline["val_videos"] for k in keys)
    im = Image.open(png)
    assert im.size[0] > 400 and im.size[1] > 200 and png.stat().st_size < 200_000
    res = pipeline["train_result"]
    runs = {"a": {"frame_mAP": res["mAP"], "per_class": {c: r["ap"] for c, r in res["per_class"].items()},
                  "names": {c: r["name"] for c, r in res["per_class"].items()}}}
    runs["b"] = dict(runs["a"], frame_mAP=0.1)
    plot_per_class_comparison(runs, run / "ap.png", chance=0.05)
    assert Image.open(run / "ap.png").size[0] > 300
    # The demo's last step, on the demo's folder layout (run_root/<head>/detections_epoch<E>.csv).
    from stssa.visualize import demo_pictures
    demo = pipeline["tmp"] / "demo"
    (demo / "stssa").mkdir(parents=True)
    (demo / "stssa" / "detections_epoch2.csv").write_bytes((run / "detections_epoch2.csv").read_bytes())
    pics = demo_pictures(p["root"], demo, {"stssa": runs["a"], "chance": {"frame_mAP": 0.05}})
    assert all(Path(q).stat().st_size > 10_000 for q in pics.values())


def test_draw_detections_changes_only_the_boxes():
    img = np.full((40, 60, 3), 128, np.uint8)
    out = draw_detections(img, [[0.25, 0.25, 0.75, 0.75]], [[]], colors=[(255, 0, 0)], scale=2, line_width=2)
    assert out.shape == (80, 120, 3) and img[0, 0, 0] == 128  # input untouched
    changed = np.abs(out.astype(int) - 128).max(axis=2) > 0
    ring = np.zeros_like(changed)
    ring[20:60, 30:90] = True
    ring[22:58, 32:88] = False  # the 2-pixel outline of the box (x 30..90, y 20..60 at scale 2)
    assert (changed == ring).all()
    cap = draw_detections(img, [[0.25, 0.25, 0.75, 0.75]], [["walk 0.81"]], scale=4)
    assert (np.abs(cap.astype(int) - 128).max(axis=2)[:80] > 0).any()  # the caption band above the box
    with pytest.raises(ValueError, match="captions"):
        draw_detections(img, [[0, 0, 1, 1]], [])


# ------------------------------------------------------------------------------------------ clip timing
class _Recorder(torch.nn.Module):
    """Stands in for the detector: records clips and RoIs, returns logits that encode the RoI's box."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, clips, rois):
        self.calls.append((clips.clone(), rois.clone()))
        return torch.zeros(len(rois), 80)


def test_clips_follow_the_dataset_timeline(tmp_path):
    video = tmp_path / "codes.mp4"
    write_video(video, (code_frame(i) for i in range(100)), 25, start_time=10)  # 10 .. 14 s at 25 fps
    cfg = {"model": {"num_classes": 80}, "data": {"num_frames": 4, "sampling_rate": 3, "test_short_side": 48}}
    model = _Recorder()
    box = np.array([[0.1, 0.2, 0.5, 0.9, 0.99]], np.float32)
    seen = []

    def boxes_for(kfs):
        seen.extend(t for t, _ in kfs)
        assert all(im.shape == (48, 64, 3) for _, im in kfs)  # the full-size keyframe
        return [box] * len(kfs)

    kfs = infer_video(model, cfg, video, boxes_for, every=1, batch_size=3)
    assert [k["time"] for k in kfs] == seen == [10, 11, 12, 13]
    assert sum(len(c) for c, _ in model.calls) == 4 and [len(c) for c, _ in model.calls] == [3, 1]
    clips = torch.cat([c for c, _ in model.calls])
    mean = torch.tensor(AVA_MEAN).view(3, 1, 1, 1) * 255
    std = torch.tensor(AVA_STD).view(3, 1, 1, 1) * 255
    for k, clip in zip(kfs, clips):
        c = int((k["time"] - 10) * 30)
        assert k["index"] == c
        pixels = (clip * std + mean).permute(1, 2, 3, 0).round().clamp(0, 255).byte().numpy()  # [T, h, w, 3]
        got = [read_code(f) for f in pixels]
        # As AVADataset: indices c + (j - T//2) * rate clamped to the segment's 120 frames; frame n shows
        # source frame floor(n * 25 / 30).
        want = [int(i) * 25 // 30 for i in clip_frame_indices(c, 4, 3, 120)]
        assert got == want, (k["time"], got, want)
    rois = torch.cat([r for _, r in model.calls])
    assert torch.allclose(rois[0, 1:], torch.tensor([0.1 * 64, 0.2 * 48, 0.5 * 64, 0.9 * 48]))
    # A segment with --start/--end clamps to the segment, and --every 0.5 gives half-second keyframes.
    kfs = infer_video(_Recorder(), cfg, video, boxes_for, every=Fraction(1, 2), start=11, end=12.5)
    assert [k["time"] for k in kfs] == [11, Fraction(23, 2), 12]
    # Detection rows: whole seconds in the AVA form, half seconds with 3 decimals.
    from stssa.infer import detection_rows, write_rows
    write_rows(tmp_path / "det.csv", detection_rows("codes", kfs, [12, 14]))
    assert [r.split(",")[1] for r in (tmp_path / "det.csv").read_text().split()] == \
        ["11.000", "11.000", "11.500", "11.500", "12.000", "12.000"]
    write_rows(tmp_path / "det.csv", detection_rows("codes", kfs[::2], [12]))
    assert (tmp_path / "det.csv").read_text().split() == ["codes,0011,0.100,0.200,0.500,0.900,12,0.5",
                                                          "codes,0012,0.100,0.200,0.500,0.900,12,0.5"]
    with pytest.raises(ValueError, match="whole number of frames"):
        infer_video(_Recorder(), cfg, video, boxes_for, every=Fraction(1, 7))


# ------------------------------------------------------------------------------------------ boxes files
def test_person_boxes_from_every_ava_form(tmp_path):
    forms = {
        "proposals8.csv": "v1,0902,0.1,0.2,0.3,0.4,,0.9\nv1,0902,0.5,0.5,0.6,0.9,,0.3\nv2,0902,0,0,1,1,,0.8\n",
        "proposals7.csv": "v1,0902,0.1,0.2,0.3,0.4,0.9\nv1,0902,0.5,0.5,0.6,0.9,0.3\n",
        "detections.csv": "v1,0902,0.1,0.2,0.3,0.4,12,0.9\nv1,0902,0.1,0.2,0.3,0.4,14,0.2\n"
                          "v1,0902,0.5,0.5,0.6,0.9,12,0.3\n",
        "annotations.csv": "v1,0902,0.1,0.2,0.3,0.4,12,0\nv1,0902,0.1,0.2,0.3,0.4,14,0\nv1,0902,0.5,0.5,0.6,0.9,12,1\n",
        "boxes.csv": "v1,0902,0.1,0.2,0.3,0.4\nv1,0902,0.5,0.5,0.6,0.9\n",
    }
    for name, text in forms.items():
        (tmp_path / name).write_text(text)
        got = read_person_boxes(tmp_path / name, "v1")
        assert list(got) == [902], name
        boxes = sorted(map(tuple, got[902][:, :4].astype(np.float64).round(3).tolist()))
        assert boxes == [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.6, 0.9)], (name, got)
        scores = got[902][:, 4]
        assert (np.diff(scores) <= 0).all()
        if name in ("annotations.csv", "boxes.csv"):
            assert (scores == 1).all()
        else:
            assert scores.tolist() == pytest.approx([0.9, 0.3])
            assert len(read_person_boxes(tmp_path / name, "v1", threshold=0.5)[902]) == 1
    with pytest.raises(ValueError, match="no boxes for video 'v3'.*'v1'"):
        read_person_boxes(tmp_path / "proposals8.csv", "v3")
    (tmp_path / "bad.csv").write_text("v1,0902,0.1,0.2\n")
    with pytest.raises(Exception, match="bad.csv:1"):
        read_person_boxes(tmp_path / "bad.csv", "v1")


# ------------------------------------------------------------------------------------- person detector
def test_person_detector_needs_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "torchvision.models.detection", None)
    with pytest.raises(PersonDetectorUnavailable, match="needs torchvision"):
        find_detector_weights()


def test_person_detector_needs_local_weights(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(PersonDetectorUnavailable, match="fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"):
        find_detector_weights()
    with pytest.raises(PersonDetectorUnavailable, match="nope.pth: no such file"):
        find_detector_weights(tmp_path / "nope.pth")
    video = tmp_path / "v.mp4"
    write_video(video, (code_frame(i) for i in range(30)), 30)
    with pytest.warns(UserWarning, match="randomly initialised"):
        rc = infer_main(["--config", "demo_tiny", "--video", str(video), "--person-detector", "torchvision",
                         "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "torch_home" in err and "--detector-weights" in err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PersonDetectorUnavailable, match="junk.pth: cannot read"):
        TorchvisionPersonDetector(tmp_path / "junk.pth")


def test_person_detector_runs_from_a_local_file(tmp_path, monkeypatch):
    det = pytest.importorskip("torchvision.models.detection")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    torch.manual_seed(0)
    model = det.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(model.state_dict(), cache / Path(det.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url).name)
    d = TorchvisionPersonDetector(threshold=0.0, min_size=96)  # found in the hub cache
    assert d.arch == "fasterrcnn_resnet50_fpn"
    out = d([code_frame(3), code_frame(200)])
    assert len(out) == 2
    for a in out:
        assert a.dtype == np.float32 and a.ndim == 2 and a.shape[1] == 5
        assert ((a[:, :4] >= 0) & (a[:, :4] <= 1)).all() and (a[:, 2] >= a[:, 0]).all()
        assert (np.diff(a[:, 4]) <= 0).all()


# ------------------------------------------------------------------------------------------ CLI errors
def test_cli_bad_video_is_one_error_line_and_the_others_run(tmp_path, capsys):
    good = tmp_path / "good.mp4"
    write_video(good, (code_frame(i) for i in range(60)), 30, start_time=900)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00 garbage" * 100)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("good,0901,0.1,0.1,0.6,0.9,,0.95\nbad,0901,0.1,0.1,0.6,0.9,,0.95\n")
    from stssa.data.labels import labelmap_pbtxt
    (tmp_path / "eval.pbtxt").write_text(labelmap_pbtxt("item"))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="randomly initialised"):
        rc = infer_main(["--config", "demo_tiny", "--video", str(good), str(bad), "--boxes", str(boxes),
                         "--labelmap", str(tmp_path / "eval.pbtxt"), "--out", str(out), "--quiet", "--device",
                         "cpu", "--no-video"])
    err = [s for s in capsys.readouterr().err.splitlines() if s.startswith("error:")]
    assert rc == 1 and len(err) == 1 and "bad.mp4" in err[0]
    rows = (out / "detections.csv").read_text().split()
    assert rows and all(r.startswith("good,0901,") for r in rows)
    assert len(rows) == 60  # one box x the 60 classes of the label map
    assert sorted(q.name for q in (out / "frames").iterdir()) == ["good_0900.jpg", "good_0901.jpg"]
    assert not (out / "good_annotated.mp4").exists()
    # Neither a config nor a checkpoint: exit 2 with the reason.
    assert infer_main(["--video", str(good), "--boxes", str(boxes), "--out", str(out), "--quiet"]) == 2
    assert "--config" in capsys.readouterr().err


def _infer_setup(tmp_path):
    from stssa.data.labels import labelmap_pbtxt
    (tmp_path / "eval.pbtxt").write_text(labelmap_pbtxt("item"))
    videos = {}
    for name in ("one", "two"):
        videos[name] = tmp_path / f"{name}.mp4"
        write_video(videos[name], (code_frame(i) for i in range(60)), 30, start_time=900)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("".join(f"{n},0901,0.1,0.1,0.6,0.9,,0.95\n" for n in videos))
    base = ["--config", "demo_tiny", "--boxes", str(boxes), "--labelmap", str(tmp_path / "eval.pbtxt"), "--quiet",
            "--device", "cpu", "--no-video"]
    return videos, boxes, base


@pytest.mark.filterwarnings("ignore:.*randomly initialised")
def test_cli_argument_errors_come_before_any_video(tmp_path, capsys):
    """Errors of the arguments themselves stop the run at once (exit 2) and leave an earlier
    detections.csv alone; they used to fail every video alike (exit 1) and rewrite it empty."""
    videos, boxes, base = _infer_setup(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "detections.csv").write_text("earlier,0901,0.1,0.1,0.6,0.9,1,0.5\n")
    same_stem = tmp_path / "sub"
    same_stem.mkdir()
    (same_stem / "one.mp4").write_bytes(videos["one"].read_bytes())
    for args in (["--video", str(videos["one"]), str(same_stem / "one.mp4")],
                 ["--video", str(videos["one"]), "--start", "903", "--end", "902"]):
        with pytest.raises(SystemExit) as e:
            infer_main(base + ["--out", str(out)] + args)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "name(s) more than one file" in err and "need --start < --end" in err
    for args, match in ((["--every", "1/7"], "whole number of frames"), (["--start", "900.01"], "frame grid"),
                        (["--boxes", str(tmp_path / "missing.csv")], "missing.csv")):
        assert infer_main(base + ["--out", str(out), "--video", str(videos["one"])] + args) == 2
        assert match in capsys.readouterr().err
    assert (out / "detections.csv").read_text() == "earlier,0901,0.1,0.1,0.6,0.9,1,0.5\n"


@pytest.mark.filterwarnings("ignore:.*randomly initialised")
def test_cli_an_unexpected_error_in_one_video_loses_nothing_else(tmp_path, capsys, monkeypatch):
    """Any exception in one video is that video's error line; the others' detections are written."""
    import stssa.infer as inf
    videos, boxes, base = _infer_setup(tmp_path)
    real = inf.render_outputs

    def render(video, video_id, *a, **k):
        if video_id == "one":
            raise RuntimeError("encoder exploded")  # e.g. av.error.ExternalError, not an OSError
        return real(video, video_id, *a, **k)
    monkeypatch.setattr(inf, "render_outputs", render)
    out = tmp_path / "out"
    assert infer_main(base + ["--out", str(out), "--video", str(videos["one"]), str(videos["two"])]) == 1
    err = [s for s in capsys.readouterr().err.splitlines() if s.startswith("error:")]
    assert len(err) == 1 and "one.mp4" in err[0] and "encoder exploded" in err[0]
    rows = (out / "detections.csv").read_text().split()
    assert rows and all(r.startswith("two,0901,") for r in rows)


@pytest.mark.filterwarnings("ignore:.*randomly initialised")
def test_cli_truncated_video_and_boxes_off_the_keyframes(tmp_path, capsys):
    """A file cut short is an error (as in stssa.data.frames), not detections on the frames that decoded;
    boxes whose timestamps miss every keyframe give a warning naming both ranges."""
    videos, boxes, base = _infer_setup(tmp_path)
    whole = tmp_path / "whole.mkv"
    write_with_pts(whole, [900 + Fraction(i, 25) for i in range(250)], gop=25)  # 900 .. 910 s
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    boxes.write_text("cut,0901,0.1,0.1,0.6,0.9,,0.95\none,0700,0.1,0.1,0.6,0.9,,0.95\n")
    out = tmp_path / "out"
    assert infer_main(base + ["--out", str(out), "--video", str(cut), str(videos["one"])]) == 1
    err = capsys.readouterr().err
    assert "cut.mkv: decoding stopped after" in err and "truncated" in err
    assert "warning: one: no box of" in err and "for one: 700..700" in err


def test_vis_scale_caps_the_long_side():
    assert vis_scale(48, 64) == 8
    assert vis_scale(2, 200) == 4096 // 200  # 360 / 2 would make a 360 x 36000 frame, which x264 refuses
    assert vis_scale(1000, 2000) == 1
