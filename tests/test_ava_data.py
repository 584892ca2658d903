"""Tests of the AVA readers, AVADataset, transforms and collate (stssa.data)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stssa.data import (AVA_EVAL_IDS, AVADataset, AVAFormatError, FrameReadError, ava_collate, clip_frame_indices,
                        count_frames, labelmap_pbtxt, read_annotations, read_exclusions, read_labelmap,
                        read_proposals)
from stssa.data.synthetic import make_dataset
from stssa.data.transforms import TrainTransform, horizontal_flip, random_crop, resize

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "ava"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/ava not present")
MEAN, STD = 0.45, 0.225


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synth"), videos=2, seconds=3, seed=3, height=48, width=64,
                        val_fraction=0.5)


def _csv_boxes(path):
    """{(vid, ts): {box tuple: sorted labels}} straight from the CSV text."""
    out = {}
    for line in Path(path).read_text().splitlines():
        r = line.split(",")
        out.setdefault((r[0], int(r[1])), {}).setdefault(tuple(float(x) for x in r[2:6]), set()).add(int(r[6]))
    return out


# ------------------------------------------------------------------------------------------------ formats
@needs_shared
def test_read_labelmap_both_official_forms():
    names80, ids80 = read_labelmap(SHARED / "ava_action_list_v2.2.pbtxt")
    names60, ids60 = read_labelmap(SHARED / "ava_action_list_v2.2_for_activitynet_2019.pbtxt")
    assert ids80 == set(range(1, 81)) and list(names80) == list(range(1, 81))
    assert sorted(ids60) == list(AVA_EVAL_IDS) and len(ids60) == 60
    assert names80[1] == names60[1] == "bend/bow (at the waist)"
    assert all(names80[i] == names60[i] for i in ids60)
    assert names80[80] == "watch (a person)" and 2 not in ids60


@needs_shared
def test_labelmap_text_equals_real_files():
    assert labelmap_pbtxt("label") == (SHARED / "ava_action_list_v2.2.pbtxt").read_text()
    assert labelmap_pbtxt("item") == (SHARED / "ava_action_list_v2.2_for_activitynet_2019.pbtxt").read_text()


def test_labelmap_compact_form_and_errors(tmp_path):
    p = tmp_path / "m.pbtxt"
    p.write_text('# comment\nitem { name: "a \\"b\\"" id: 3 }\n'
                 'label {\n  name: "c"\n  label_id: 7\n  label_type: X\n}\n')
    assert read_labelmap(p) == ({3: 'a "b"', 7: "c"}, {3, 7})
    p.write_text('item {\n  name: "a"\n  id: 1\n}\nitem {\n  name: "b"\n}\n')
    with pytest.raises(AVAFormatError, match=r"m\.pbtxt:5: .*needs a name and an id"):
        read_labelmap(p)
    p.write_text('item {\n  name: "a"\n  id: 1\n}\nitem {\n  name: "b"\n  id: 1\n}\n')
    with pytest.raises(AVAFormatError, match=r"m\.pbtxt:7: class id 1 appears twice"):
        read_labelmap(p)
    p.write_text('item {\n  name: "a"\n  id: one\n}\n')
    with pytest.raises(AVAFormatError, match=r"m\.pbtxt:3: id must be an integer"):
        read_labelmap(p)
    p.write_text('item {\n  name: "a"\n  id: 1\n')
    with pytest.raises(AVAFormatError, match=r"m\.pbtxt:1: block is not closed"):
        read_labelmap(p)


@needs_shared
def test_read_annotations_sample_merges_rows():
    ann = read_annotations(SHARED / "ava_train_v2.2_sample.csv")
    assert list(ann) == [("0f39OWEqJ24", 902), ("0f39OWEqJ24", 903), ("_-Z6wFjXtGQ", 902)]
    (b,) = ann[("0f39OWEqJ24", 902)]
    assert b.box == (0.031, 0.162, 0.670, 0.995) and b.labels == (12, 17, 79) and b.person_id == 0 and b.line == 1
    assert ann[("_-Z6wFjXtGQ", 902)][0].labels == (12, 74, 80) and ann[("_-Z6wFjXtGQ", 902)][0].line == 6
    only = read_annotations(SHARED / "ava_train_v2.2_sample.csv", class_whitelist={17, 74})
    assert {k: [x.labels for x in v] for k, v in only.items()} == {
        ("0f39OWEqJ24", 902): [(17,)], ("0f39OWEqJ24", 903): [(17,)], ("_-Z6wFjXtGQ", 902): [(74,)]}


def test_read_annotations_forms_and_errors(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("v,0902,0.1,0.2,0.3,0.4,12\nv,902,0.1,0.2,0.3,0.4,14\nv,0902,0.5,0.2,0.7,0.4,12,3\n\n")
    ann = read_annotations(p)
    assert [(b.labels, b.person_id) for b in ann[("v", 902)]] == [((12, 14), -1), ((12,), 3)]
    for text, msg in [("v,0902,0.1,0.2,0.3,0.4,12,0\nv,0902,0.1,0.2,0.3\n", r"a\.csv:2: expected 7 or 8"),
                      ("v,0902,0.1,0.2,0.3,0.4,12,0\nv,0902,0.1,x,0.3,0.4,12,0\n", r"a\.csv:2: box coordinate"),
                      ("v,0902,0.5,0.2,0.3,0.4,12,0\n", r"a\.csv:1: box .* x1 <= x2"),
                      ("v,0902,0.1,0.2,0.3,0.4,walk,0\n", r"a\.csv:1: action_id must be an integer")]:
        p.write_text(text)
        with pytest.raises(AVAFormatError, match=msg):
            read_annotations(p)


@needs_shared
def test_read_exclusions_sample():
    assert read_exclusions(SHARED / "ava_val_excluded_timestamps_sample.csv") == {("0f39OWEqJ24", 903),
                                                                                  ("_-Z6wFjXtGQ", 905)}


def test_read_proposals_pickle_and_csv(tmp_path):
    props = {"v,0902": np.array([[0.1, 0.1, 0.5, 0.9, 0.95], [0.6, 0.1, 0.9, 0.9, 0.5], [0.0, 0.0, 1.2, 0.2, 0.85]]),
             "-w_x,1000": np.zeros((0, 5))}
    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump(props, f)
    got = read_proposals(tmp_path / "p.pkl", 0.8)
    assert set(got) == {("v", 902), ("-w_x", 1000)} and got[("-w_x", 1000)].shape == (0, 5)
    np.testing.assert_allclose(got[("v", 902)], [[0.1, 0.1, 0.5, 0.9, 0.95], [0.0, 0.0, 1.0, 0.2, 0.85]], atol=1e-6)
    assert got[("v", 902)].dtype == np.float32
    # CSV: PySlowFast's 8 columns with an empty action, 7 columns, and a per-action file repeating a box.
    (tmp_path / "p.csv").write_text("v,0902,0.100,0.100,0.500,0.900,,0.95\nv,0902,0.6,0.1,0.9,0.9,0.5\n"
                                    "w,0903,0.1,0.1,0.5,0.9,12,0.7\nw,0903,0.1,0.1,0.5,0.9,14,0.9\n")
    got = read_proposals(tmp_path / "p.csv", 0.0)
    np.testing.assert_allclose(got[("v", 902)][:, 4], [0.95, 0.5], atol=1e-6)
    np.testing.assert_allclose(got[("w", 903)], [[0.1, 0.1, 0.5, 0.9, 0.9]], atol=1e-6)
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump({"v,0902": np.zeros((2, 4))}, f)
    with pytest.raises(AVAFormatError, match=r"bad\.pkl: proposals for key 'v,0902' must be an N x 5"):
        read_proposals(tmp_path / "bad.pkl")
    (tmp_path / "bad.csv").write_text("v,0902,0.1,0.1,0.5,0.9,,\n")
    with pytest.raises(AVAFormatError, match=r"bad\.csv:1: score must be a number"):
        read_proposals(tmp_path / "bad.csv")


def test_text_files_bom_encoding_and_suffix(tmp_path):
    """A UTF-8 byte-order mark (spreadsheet exports) is not part of the first video id; text that is not
    UTF-8 is an error naming the file; a '.PKL' suffix is a pickle."""
    (tmp_path / "ex.csv").write_bytes("\ufeffvidA,0902\nvidB,0903\n".encode("utf-8"))
    assert read_exclusions(tmp_path / "ex.csv") == {("vidA", 902), ("vidB", 903)}
    (tmp_path / "ann.csv").write_bytes("\ufeffvidA,0902,0.1,0.1,0.5,0.5,12,0\n".encode("utf-8"))
    assert list(read_annotations(tmp_path / "ann.csv")) == [("vidA", 902)]
    (tmp_path / "m.pbtxt").write_bytes('\ufeffitem { name: "a" id: 3 }\n'.encode("utf-8"))
    assert read_labelmap(tmp_path / "m.pbtxt") == ({3: "a"}, {3})
    (tmp_path / "latin1.csv").write_bytes("vid\xe9,0902,0.1,0.1,0.5,0.5,12,0\n".encode("latin-1"))
    with pytest.raises(AVAFormatError, match=r"latin1\.csv: not UTF-8 text"):
        read_annotations(tmp_path / "latin1.csv")
    (tmp_path / "m2.pbtxt").write_bytes('item { name: "caf\xe9" id: 3 }\n'.encode("latin-1"))
    with pytest.raises(AVAFormatError, match=r"m2\.pbtxt: not UTF-8 text"):
        read_labelmap(tmp_path / "m2.pbtxt")
    with open(tmp_path / "p.PKL", "wb") as f:
        pickle.dump({"v,0902": np.array([[0.1, 0.1, 0.5, 0.9, 0.95]])}, f)
    assert list(read_proposals(tmp_path / "p.PKL")) == [("v", 902)]
    with open(tmp_path / "ragged.pkl", "wb") as f:
        pickle.dump({"v,0902": [[0.1, 0.1, 0.5, 0.9, 0.95], [0.1]]}, f)
    with pytest.raises(AVAFormatError, match=r"ragged\.pkl: proposals for key 'v,0902' are not a numeric"):
        read_proposals(tmp_path / "ragged.pkl")


# --------------------------------------------------------------------------------------- clip sampling
def test_clip_frame_indices_centred_and_clamped():
    np.testing.assert_array_equal(clip_frame_indices(60, 4, 2, 390), [56, 58, 60, 62])
    np.testing.assert_array_equal(clip_frame_indices(60, 5, 3, 390), [54, 57, 60, 63, 66])
    np.testing.assert_array_equal(clip_frame_indices(2, 4, 2, 390), [0, 0, 2, 4])
    np.testing.assert_array_equal(clip_frame_indices(388, 4, 2, 390), [384, 386, 388, 389])


def test_count_frames(tmp_path):
    (tmp_path / "v").mkdir()
    for i in range(1, 38):
        (tmp_path / "v" / f"v_{i:06d}.jpg").touch()
    assert count_frames(tmp_path, "v") == 37
    assert count_frames(tmp_path, "w") == 0
    assert count_frames(tmp_path, "v", "{video_id}/{video_id}_{frame:06d}.jpg", frame_start=0) == 0
    (tmp_path / "v" / "v_000017.jpg").unlink()  # a gap where the search probes: it stops there ...
    assert count_frames(tmp_path, "v") == 16
    assert count_frames(tmp_path, "v", start=20) == 37  # ... and counting from a frame past it goes on


def test_frame_pattern_must_name_both_fields(synth):
    """Without {frame} every index names one file (the frame count would never end); a wrong field name
    is an error naming frame_pattern, not a bare KeyError."""
    for pattern, match in (("{video_id}/{video_id}_000001.jpg", "must use both"),
                           ("{video_id}/{video_id}_{index:06d}.jpg", r"fields \{video_id\} and \{frame\} only"),
                           ("{frame:06d}.jpg", "must use both")):
        with pytest.raises(ValueError, match=rf"frame_pattern .*{match}"):
            AVADataset(synth["frames"], synth["train_csv"], synth["labelmap"], "val", frame_pattern=pattern)


# -------------------------------------------------------------------------------------------- dataset
def test_dataset_round_trip_on_synthetic(synth):
    lm = synth["labelmap"]
    csv_boxes = _csv_boxes(synth["train_csv"])
    ds = AVADataset(synth["frames"], synth["train_csv"], lm, "val", num_frames=4, sampling_rate=3, crop_size=48)
    assert len(ds) == len(csv_boxes) == 3 and ds.keyframes == list(csv_boxes)
    for i in range(len(ds)):
        it = ds[i]
        key = (it["video_id"], it["timestamp"])
        want = csv_boxes[key]
        assert it["clip"].shape == (3, 4, 48, 64) and it["clip"].dtype == torch.float32
        assert [tuple(round(float(x), 3) for x in b) for b in it["norm_boxes"]] == list(want)
        for b, lab in zip(it["norm_boxes"], it["labels"]):
            assert set((torch.nonzero(lab).flatten() + 1).tolist()) == want[tuple(round(float(x), 3) for x in b)]
        torch.testing.assert_close(it["boxes"], it["norm_boxes"] * torch.tensor([64.0, 48, 64, 48]))
        assert torch.equal(it["scores"], torch.ones(len(want)))
        # Pixels: the keyframe (centre of the clip) is the JPEG at index (ts - 900) * 30, file number + 1.
        idx = (it["timestamp"] - 900) * 30
        path = Path(synth["frames"]) / key[0] / f"{key[0]}_{idx + 1:06d}.jpg"
        img = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()
        torch.testing.assert_close(it["clip"][:, 2], (img / 255 - MEAN) / STD, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(ds.frame_indices(i), idx + np.array([-6, -3, 0, 3]))


def test_dataset_val_with_proposals_and_exclusions(synth):
    excluded = read_exclusions(synth["excluded_csv"])
    props = read_proposals(synth["val_proposals_pkl"], 0.8)
    common = dict(num_frames=2, sampling_rate=1, crop_size=24, test_short_side=24)
    ds = AVADataset(synth["frames"], synth["val_csv"], synth["labelmap_eval"], "val",
                    proposals=synth["val_proposals_pkl"], exclusions=synth["excluded_csv"], **common)
    assert set(ds.keyframes).isdisjoint(excluded)
    assert set(ds.keyframes) == {k for k in _csv_boxes(synth["val_csv"]) if len(props.get(k, []))}
    gt = read_annotations(synth["val_csv"])
    for i in range(len(ds)):
        it = ds[i]
        key = (it["video_id"], it["timestamp"])
        assert it["clip"].shape == (3, 2, 24, 32)
        np.testing.assert_allclose(it["norm_boxes"].numpy(), props[key][:, :4])
        np.testing.assert_allclose(it["scores"].numpy(), props[key][:, 4])
        assert (it["scores"] >= 0.8).all()
        for nb, lab in zip(it["norm_boxes"].numpy(), it["labels"]):  # labels of the GT box with IoU >= 0.5
            ious = [_iou(nb, b.box) for b in gt[key]]
            j = int(np.argmax(ious))
            want = set(gt[key][j].labels) if ious[j] >= 0.5 else set()
            assert set((torch.nonzero(lab).flatten() + 1).tolist()) == want
    # Without annotations: the proposal keyframes (including excluded ones unless exclusions are given).
    ds2 = AVADataset(synth["frames"], None, synth["labelmap_eval"], "val", proposals=props, proposal_threshold=0.8,
                     **common)
    assert set(ds2.keyframes) == {k for k, v in props.items() if len(v)} and ds2[0]["labels"].sum() == 0
    raw = {f"{v},{t:04d}": a for (v, t), a in props.items()}  # the pickle's own key form works too
    ds3 = AVADataset(synth["frames"], None, synth["labelmap_eval"], "val", proposals=raw, proposal_threshold=0.8,
                     **common)
    assert ds3.keyframes == ds2.keyframes


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih)


def _write_video(root, vid, frames):
    (root / vid).mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(root / vid / f"{vid}_{i + 1:06d}.jpg", quality=95)


@pytest.fixture
def painted(tmp_path):
    """One video whose frames are black with a red and a green rectangle at known boxes."""
    h, w = 60, 80
    red, green = (10, 12, 30, 50), (45, 5, 70, 40)  # pixel boxes x1, y1, x2, y2
    frame = np.zeros((h, w, 3), np.uint8)
    frame[red[1]:red[3], red[0]:red[2]] = (255, 0, 0)
    frame[green[1]:green[3], green[0]:green[2]] = (0, 255, 0)
    _write_video(tmp_path / "frames", "vid", [frame] * 90)
    rows = [f"vid,0901,{b[0] / w:.4f},{b[1] / h:.4f},{b[2] / w:.4f},{b[3] / h:.4f},{a},0"
            for b, a in ((red, 12), (green, 14))]
    (tmp_path / "ann.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def _colour_bbox(clip, channel):
    """Bounding box (x1, y1, x2, y2) of pixels dominated by ``channel`` in frame 0 of a normalised clip."""
    img = (clip[:, 0] * STD + MEAN) * 255
    other = [c for c in range(3) if c != channel]
    mask = (img[channel] > 127.5) & (img[other].max(0).values < 127.5)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_augmentation_keeps_boxes_on_the_pixels(painted):
    ds = AVADataset(painted / "frames", painted / "ann.csv", {12: "stand", 14: "walk"}, "train", num_frames=2,
                    sampling_rate=1, crop_size=40, jitter_scales=(40, 90), flip_prob=0.5, video_start_sec=900)
    torch.manual_seed(0)
    flips = seen = 0
    for _ in range(40):
        it = ds[0]
        assert it["clip"].shape == (3, 2, 40, 40)
        for box, lab in zip(it["boxes"], it["labels"]):
            channel = 0 if lab[11] == 1 else 1
            bb = _colour_bbox(it["clip"], channel)
            assert bb is not None, "a kept box must show its colour"
            # Bilinear resampling moves a thresholded edge by at most about half a source pixel.
            torch.testing.assert_close(bb, box, atol=1.01, rtol=0)
            seen += 1
        # The red box is left of the green one unless the clip was flipped.
        if len(it["boxes"]) == 2:
            flips += bool(it["boxes"][0, 0] > it["boxes"][1, 0])
        for nb, lab in zip(it["norm_boxes"], it["labels"]):  # un-augmented boxes, for detection files
            assert float(nb[0]) == pytest.approx(10 / 80 if lab[11] == 1 else 45 / 80, abs=1e-4)
    assert seen >= 40 and 0 < flips < 40


def test_transform_pieces_move_boxes_with_pixels():
    clip = torch.arange(20 * 40, dtype=torch.float32).view(1, 1, 20, 40).expand(2, 3, 20, 40)
    boxes = torch.tensor([[4.0, 2.0, 12.0, 18.0], [30.0, 0.0, 40.0, 20.0]])
    small, b = resize(clip, boxes, (10, 20))
    assert small.shape == (2, 3, 10, 20) and b.tolist() == (boxes / 2).tolist()
    flipped, b = horizontal_flip(clip, boxes)
    assert torch.equal(flipped[..., 0], clip[..., 39]) and b.tolist() == [[28, 2, 36, 18], [0, 0, 10, 20]]
    crop, b = random_crop(clip, boxes, 16, generator=torch.Generator().manual_seed(1))
    y0, x0 = divmod(int(crop[0, 0, 0, 0]), 40)  # the crop's top-left pixel tells where it was taken
    assert torch.equal(crop, clip[..., y0:y0 + 16, x0:x0 + 16])
    want = (boxes - torch.tensor([x0, y0, x0, y0])).clamp(0, 16)
    assert b.tolist() == want.tolist()
    with pytest.raises(ValueError, match="smaller than the crop size"):
        random_crop(clip, boxes, 24)
    with pytest.raises(ValueError, match="crop_size <= jitter_scales"):
        TrainTransform(crop_size=30, jitter_scales=(20, 40))


def test_errors_name_file_and_line(synth, tmp_path):
    frames = Path(synth["frames"])
    vid = sorted(p.name for p in frames.iterdir())[0]
    all_rows = Path(synth["train_csv"]).read_text().splitlines() + Path(synth["val_csv"]).read_text().splitlines()
    rows = [r for r in all_rows if r.startswith(vid + ",")]
    ann = tmp_path / "ann.csv"
    ann.write_text("\n".join(rows) + f"\nnotavideo00,0903,0.1,0.1,0.5,0.5,12,0\n")
    with pytest.raises(FileNotFoundError, match=rf"ann\.csv:{len(rows) + 1}: unknown video 'notavideo00'.*"
                                                rf"notavideo00_000001\.jpg"):
        AVADataset(frames, ann, synth["labelmap"], "val", num_frames=4, crop_size=48)
    ann.write_text("\n".join(rows) + "\n")
    ds = AVADataset(frames, ann, synth["labelmap"], "val", num_frames=4, sampling_rate=2, crop_size=48)
    # Copy the video so that files can be broken without touching the shared fixture.
    broken = tmp_path / "frames" / vid
    broken.mkdir(parents=True)
    for p in (frames / vid).iterdir():
        broken.joinpath(p.name).write_bytes(p.read_bytes())
    ds.frame_root = str(tmp_path / "frames")
    idx = ds.frame_indices(0)
    missing = broken / f"{vid}_{idx[0] + 1:06d}.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=rf"missing frame .*{missing.name} .*ann\.csv:1"):
        ds[0]
    (broken / f"{vid}_{idx[0] + 1:06d}.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(FrameReadError, match=rf"unreadable JPEG .*{missing.name} .*ann\.csv:1"):
        ds[0]
    ann.write_text(rows[0] + "\n" + rows[0].rsplit(",", 3)[0] + "\n")
    with pytest.raises(AVAFormatError, match=r"ann\.csv:2: expected 7 or 8"):
        AVADataset(frames, ann, synth["labelmap"], "val")
    ann.write_text(rows[0].replace(",0902,", ",0999,") + "\n")
    with pytest.raises(FileNotFoundError, match=r"ann\.csv:1: keyframe .*,0999 is frame index 2970, outside video"):
        AVADataset(frames, ann, synth["labelmap"], "val")


def test_a_lost_frame_fails_only_the_clips_that_need_it(synth, tmp_path):
    """One missing frame file (a gap in the numbering) does not make the video's later keyframes
    'outside the video': the dataset builds, clips that do not need the lost frame load, and one that
    does fails alone, naming the lost file."""
    frames = Path(synth["frames"])
    vid = sorted(p.name for p in frames.iterdir())[0]
    (tmp_path / vid).mkdir()
    for p in (frames / vid).iterdir():
        (tmp_path / vid / p.name).write_bytes(p.read_bytes())
    common = dict(num_frames=4, sampling_rate=4, crop_size=48)
    ds0 = AVADataset(frames, synth["train_csv"], synth["labelmap"], "val", **common)
    mine = [i for i, (v, _) in enumerate(ds0.keyframes) if v == vid]
    assert ds0.frame_indices(mine[0]).tolist() == [52, 56, 60, 64]  # keyframe 902 s
    # 32 (no clip needs it) and 64 (the first clip's last frame) are where the frame count's search looks:
    # without the gap probe it would stop at 32 and then at 64, and clamp that clip to frame 63
    for lost in (32, 64):
        (tmp_path / vid / f"{vid}_{lost + 1:06d}.jpg").unlink()
        ds = AVADataset(tmp_path, synth["train_csv"], synth["labelmap"], "val", **common)
        assert ds.keyframes == ds0.keyframes and ds.video_lengths[vid] == ds0.video_lengths[vid]
        for i in mine:
            if lost in ds.frame_indices(i).tolist():
                with pytest.raises(FileNotFoundError, match=rf"missing frame .*{vid}_{lost + 1:06d}\.jpg"):
                    ds[i]
            else:
                assert torch.equal(ds[i]["clip"], ds0[i]["clip"])


def test_in_memory_arguments_are_checked(synth):
    """Proposals, exclusions and label maps given as Python objects get the checks of their file forms."""
    common = dict(num_frames=2, sampling_rate=1, crop_size=24)
    props = read_proposals(synth["val_proposals_pkl"], 0.0)
    key = next(k for k, v in props.items() if len(v))
    raw = {f"{k[0]},{k[1]:04d}": v.astype(np.float64) for k, v in props.items()}
    for bad, match in ((raw[f"{key[0]},{key[1]:04d}"][:, :4], "must be an N x 5 array"),
                       (np.array([[0.5, 0.1, 0.2, 0.9, 0.9]]), "non-finite or inverted box"),
                       (np.array([[0.1, np.nan, 0.2, 0.9, 0.9]]), "non-finite or inverted box")):
        with pytest.raises(AVAFormatError, match=rf"<proposals dict>: proposals for key .*{match}"):
            AVADataset(synth["frames"], None, synth["labelmap_eval"], "val",
                       proposals={**raw, f"{key[0]},{key[1]:04d}": bad}, **common)
    # unsorted, out-of-range rows are sorted and clipped as read_proposals does
    shuffled = {k: (v[::-1] * np.array([1, 1, 1.2, 1, 1])) for k, v in raw.items()}
    ds = AVADataset(synth["frames"], None, synth["labelmap_eval"], "val", proposals=shuffled,
                    proposal_threshold=0.0, **common)
    for i in range(len(ds)):
        sc = ds.items[i][4]
        assert (np.diff(sc) <= 0).all() and ds.items[i][2].max() <= 1.0
    with pytest.raises(ValueError, match="exclusions must be a CSV path or a set of"):
        AVADataset(synth["frames"], synth["val_csv"], synth["labelmap"], "val", exclusions={"vid,0902"}, **common)
    with pytest.raises(ValueError, match="labelmap must be a label-map path"):
        AVADataset(synth["frames"], synth["val_csv"], 80, "val", **common)


def test_dataloader_with_workers_and_collate(synth):
    ds = AVADataset(synth["frames"], synth["train_csv"], synth["labelmap"], "train", num_frames=4, sampling_rate=2,
                    crop_size=32, jitter_scales=(32, 40))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=ava_collate, shuffle=True,
                                         persistent_workers=False)
    n_boxes = 0
    for batch in loader:
        b = len(batch["boxes_per_clip"])
        assert batch["clips"].shape == (b, 3, 4, 32, 32)
        k = int(batch["boxes_per_clip"].sum())
        assert batch["rois"].shape == (k, 5) and batch["labels"].shape == (k, 80) and len(batch["meta"]) == k
        want_idx = torch.repeat_interleave(torch.arange(b), batch["boxes_per_clip"]).float()
        assert torch.equal(batch["rois"][:, 0], want_idx)
        assert ((batch["rois"][:, 1:] >= 0) & (batch["rois"][:, 1:] <= 32)).all()
        assert (batch["labels"].sum(1) >= 1).all()
        vid, ts, nb, score = batch["meta"][0]
        assert isinstance(vid, str) and isinstance(ts, int) and nb.shape == (4,) and score == 1.0
        n_boxes += k
    assert n_boxes >= len(ds)  # at least one person per keyframe survives the crop


def test_collate_pads_different_sizes():
    a = {"clip": torch.ones(3, 2, 4, 6), "boxes": torch.tensor([[0.0, 0, 6, 4]]), "labels": torch.zeros(1, 80),
         "norm_boxes": torch.tensor([[0.0, 0, 1, 1]]), "scores": torch.tensor([0.9]), "video_id": "a", "timestamp": 902}
    b = {"clip": torch.ones(3, 2, 5, 3), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, 80),
         "norm_boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "video_id": "b", "timestamp": 903}
    out = ava_collate([a, b])
    assert out["clips"].shape == (2, 3, 2, 5, 6)
    assert out["clips"][0, :, :, 4].abs().sum() == 0 and out["clips"][1, :, :, :, 3:].abs().sum() == 0
    assert out["rois"].tolist() == [[0.0, 0.0, 0.0, 6.0, 4.0]] and out["boxes_per_clip"].tolist() == [1, 0]
    assert out["meta"][0][0] == "a" and out["meta"][0][3] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="differ in channels/frames"):
        ava_collate([a, dict(b, clip=torch.ones(3, 3, 5, 3))])
