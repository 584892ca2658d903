"""AVA clips with person boxes and multi-hot actions, read from JPEG frame folders.

Frames live at ``{frame_root}/{frame_pattern}``, by default ``{video_id}/{video_id}_{frame:06d}.jpg`` (the
PySlowFast layout). Each video folder holds the 15-minute AVA clip cut from second 900 at 30 fps, so the
keyframe at second ``s`` is frame index ``(s - 900) * 30``; frame index ``i`` is the file numbered
``i + frame_start`` (``frame_start=1`` because ffmpeg's ``%06d``, used by PySlowFast's extraction script,
numbers from 1). A clip is ``num_frames`` frames ``sampling_rate`` apart centred on the keyframe
(indices ``c + (k - num_frames // 2) * sampling_rate``), clamped to the video's first and last frame.

Items (``AVADataset[i]``) are dicts:

* ``clip``: ``float32 Tensor[3, T, H, W]``, normalised ``(x / 255 - mean) / std``. Train: ``H = W =
  crop_size`` after short-side jitter in ``jitter_scales``, random crop and horizontal flip. Val: the
  short side resized to ``test_short_side`` (default ``crop_size``), no crop.
* ``boxes``: ``float32 Tensor[L, 4]`` ``(x1, y1, x2, y2)`` in continuous pixel coordinates of ``clip``
  (whole frame = ``(0, 0, W, H)``; see :mod:`stssa.data.transforms`).
* ``labels``: ``float32 Tensor[L, num_classes]`` multi-hot, column ``action_id - 1``.
* ``norm_boxes``: ``float32 Tensor[L, 4]`` the boxes as read (normalised, un-augmented): write these into
  detection CSVs.
* ``scores``: ``float32 Tensor[L]``: 1.0 for ground-truth boxes, the detector score for proposals.
* ``video_id`` ``str``, ``timestamp`` ``int``.

Boxes: ``split="train"`` uses the ground-truth boxes (rows of one box merged, see
:func:`~stssa.data.formats.read_annotations`); boxes left with under one pixel inside the crop are dropped,
so ``L`` may be 0. ``split="val"`` uses the person proposals scoring ``>= proposal_threshold`` when
``proposals`` is given (each proposal takes the labels of the ground-truth box it overlaps most if that IoU
is ``>= 0.5``, else no label; keyframes without proposals are skipped; they count as misses in the
evaluation), else the ground-truth boxes.

:func:`ava_collate` batches items with different numbers of boxes (and, at val, different frame sizes,
zero-padded at the bottom/right, which leaves box coordinates valid).

Errors name the file and line: a missing frame or an unreadable JPEG names the JPEG and the annotation
line that needed it; an unknown video (no first frame) names the annotation line that refers to it;
malformed CSV rows raise :class:`~stssa.data.formats.AVAFormatError` with ``file:line``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from stssa.data.formats import _as_labelmap, proposals_from_dict, read_annotations, read_exclusions, read_proposals
from stssa.data.transforms import TestTransform, TrainTransform

__all__ = ["AVADataset", "ava_collate", "FrameReadError", "DEFAULT_FRAME_PATTERN", "keyframe_index",
           "clip_frame_indices", "count_frames", "frame_path"]

DEFAULT_FRAME_PATTERN = "{video_id}/{video_id}_{frame:06d}.jpg"
AVA_MEAN = (0.45, 0.45, 0.45)
AVA_STD = (0.225, 0.225, 0.225)


class FrameReadError(RuntimeError):
    """A frame file exists but cannot be decoded, or its size differs from the clip's other frames."""


def keyframe_index(timestamp: int, fps: int = 30, video_start_sec: int = 900) -> int:
    """Frame index of the keyframe at second ``timestamp`` in a clip cut from ``video_start_sec``."""
    return (int(timestamp) - video_start_sec) * fps


def clip_frame_indices(center: int, num_frames: int, sampling_rate: int, num_video_frames: int) -> np.ndarray:
    """``int64[num_frames]`` indices ``center + (k - num_frames // 2) * sampling_rate``, clamped to
    ``[0, num_video_frames - 1]`` (the video's ends repeat)."""
    idx = center + (np.arange(num_frames, dtype=np.int64) - num_frames // 2) * sampling_rate
    return np.clip(idx, 0, num_video_frames - 1)


def frame_path(frame_root, video_id: str, index: int, pattern: str = DEFAULT_FRAME_PATTERN,
               frame_start: int = 1) -> str:
    """Path of frame ``index`` (0-based) of ``video_id``."""
    return os.path.join(frame_root, pattern.format(video_id=video_id, frame=index + frame_start))


def _check_frame_pattern(pattern: str) -> None:
    """A pattern must name both fields (without ``{frame}`` every index maps to one file)."""
    try:
        a, b = pattern.format(video_id="v", frame=1), pattern.format(video_id="v", frame=2)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ValueError(f"AVADataset: frame_pattern {pattern!r} must use the fields {{video_id}} and {{frame}} "
                         f"only ({type(e).__name__}: {e})") from None
    if a == b or "{video_id" not in pattern:
        raise ValueError(f"AVADataset: frame_pattern {pattern!r} must use both {{video_id}} and {{frame}}, "
                         f"e.g. {DEFAULT_FRAME_PATTERN!r}")


#: More frames than any video has (an hour at 30 fps is 108000): the galloping search stops there.
MAX_FRAMES = 1 << 30


def count_frames(frame_root, video_id: str, pattern: str = DEFAULT_FRAME_PATTERN, frame_start: int = 1,
                 start: int = 0) -> int:
    """Number of consecutive frames ``0, 1, ...`` present (0 if the first is missing), by galloping and
    binary search on file existence: about ``2 log2(n)`` ``stat`` calls instead of listing the folder.
    With ``start`` (an index that exists): the first missing index after it, i.e. the count of frames
    when the only gaps lie before ``start``."""
    def exists(i):
        return os.path.exists(frame_path(frame_root, video_id, i, pattern, frame_start))

    if not exists(start):
        return 0 if start == 0 else start
    lo, hi = start, 2 * start + 1  # invariant: lo exists
    while exists(hi):
        if hi >= MAX_FRAMES:
            raise ValueError(f"count_frames: {frame_path(frame_root, video_id, hi, pattern, frame_start)} exists: "
                             f"the pattern {pattern!r} names one file for every frame index")
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # lo exists, hi missing
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if exists(mid) else (lo, mid)
    return hi


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, M]`` IoU of normalised boxes."""
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


class AVADataset(Dataset):
    """AVA keyframes as clips + boxes + multi-hot labels (item format in the module docstring).

    Args:
        frame_root: folder holding the frames (``{frame_root}/{frame_pattern}``).
        annotation_csv: AVA annotation CSV (train or val). May be ``None`` at ``split="val"`` with
            ``proposals``: the keyframes are then those of the proposals and every label is 0.
        labelmap: label map path / ``{id: name}`` / ``read_labelmap`` output: rows of other classes are
            dropped (pass the 80-class map to train on all classes).
        split: ``"train"`` (augmentation, ground-truth boxes) or ``"val"`` (test resize, proposals).
        num_frames, sampling_rate: clip length ``T`` and frame stride.
        crop_size: train crop side; also the default test short side.
        proposals: val only: proposal file (``.pkl`` or CSV, see ``read_proposals``) or its dict.
        proposal_threshold: keep proposals scoring at least this.
        exclusions: excluded-timestamps CSV or set of ``(video_id, timestamp)``: these keyframes are skipped.
        frame_pattern, frame_start: file naming, see the module docstring.
        fps, video_start_sec: keyframe ``s`` is frame ``(s - video_start_sec) * fps``.
        jitter_scales: train short-side range, default ``(crop_size, round(crop_size * 1.25))`` (256-320 for
            the usual 256 crop, as PySlowFast).
        flip_prob: train horizontal-flip probability.
        test_short_side: val short side (default ``crop_size``).
        mean, std: normalisation per RGB channel, on ``[0, 1]`` pixel values.
        num_classes: label vector width (80 for AVA; label ids must be ``<= num_classes``).
        video_lengths: optional ``{video_id: number of frames}``; otherwise found by probing the files.
    """

    def __init__(self, frame_root, annotation_csv, labelmap, split: str = "train", num_frames: int = 32,
                 sampling_rate: int = 2, crop_size: int = 256, proposals=None, proposal_threshold: float = 0.8,
                 exclusions=None, frame_pattern: str = DEFAULT_FRAME_PATTERN, frame_start: int = 1, fps: int = 30,
                 video_start_sec: int = 900, jitter_scales: tuple[int, int] | None = None, flip_prob: float = 0.5,
                 test_short_side: int | None = None, mean=AVA_MEAN, std=AVA_STD, num_classes: int = 80,
                 video_lengths: dict[str, int] | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"AVADataset: split must be 'train' or 'val', got {split!r}")
        _check_frame_pattern(frame_pattern)
        if num_frames < 1 or sampling_rate < 1:
            raise ValueError(f"AVADataset: num_frames and sampling_rate must be >= 1, got {num_frames}, "
                             f"{sampling_rate}")
        if split == "train" and proposals is not None:
            raise ValueError("AVADataset: proposals are used at split='val' only (training uses ground-truth boxes)")
        if annotation_csv is None and proposals is None:
            raise ValueError("AVADataset: give annotation_csv, or proposals at split='val'")
        self.frame_root = str(frame_root)
        self.annotation_csv = None if annotation_csv is None else str(annotation_csv)
        self.split = split
        self.num_frames, self.sampling_rate = int(num_frames), int(sampling_rate)
        self.frame_pattern, self.frame_start = frame_pattern, int(frame_start)
        self.fps, self.video_start_sec = int(fps), int(video_start_sec)
        self.num_classes = int(num_classes)
        self.class_names, class_ids = _as_labelmap(labelmap)
        if not class_ids:
            raise ValueError("AVADataset: the label map is empty")
        if max(class_ids) > self.num_classes or min(class_ids) < 1:
            raise ValueError(f"AVADataset: label ids must lie in 1..num_classes={self.num_classes}, "
                             f"label map has {min(class_ids)}..{max(class_ids)}")
        if split == "train":
            jitter = jitter_scales or (crop_size, int(round(crop_size * 1.25)))
            self.transform = TrainTransform(crop_size, jitter, flip_prob, mean, std)
        else:
            self.transform = TestTransform(test_short_side or crop_size, mean, std)

        excluded = set()
        if isinstance(exclusions, (str, os.PathLike)):
            excluded = read_exclusions(exclusions)
        elif exclusions is not None:
            try:
                excluded = {(str(v), int(t)) for v, t in exclusions}
            except (TypeError, ValueError):
                raise ValueError(f"AVADataset: exclusions must be a CSV path or a set of (video_id, timestamp) "
                                 f"pairs, got {exclusions!r:.80}") from None
        gt = read_annotations(annotation_csv, class_ids) if annotation_csv is not None else {}
        props, props_src = None, None
        if proposals is not None:
            if isinstance(proposals, (str, os.PathLike)):
                props, props_src = read_proposals(proposals, proposal_threshold), str(proposals)
            else:  # read_proposals' {(video_id, ts): [N, 5]} or the raw pickle's {"video_id,0902": [N, 5]}
                props_src = "<proposals dict>"
                props = proposals_from_dict(proposals, proposal_threshold, props_src)

        # Each item: (video_id, timestamp, norm boxes [L,4], label-id tuples, scores [L], source "file:line").
        self.items: list[tuple] = []
        keys = list(gt) if annotation_csv is not None else list(props)
        for key in keys:
            if key in excluded:
                continue
            boxes_here = gt.get(key, [])
            # Where the keyframe came from, for error messages: the annotation line, else the proposal key.
            src = f"{self.annotation_csv}:{boxes_here[0].line}" if boxes_here else \
                f"{props_src}: key '{key[0]},{key[1]:04d}'"
            if props is None:
                norm = np.array([b.box for b in boxes_here], np.float32).reshape(-1, 4)
                labels = [b.labels for b in boxes_here]
                scores = np.ones(len(boxes_here), np.float32)
            else:
                p = props.get(key)
                if p is None or len(p) == 0:
                    continue
                norm, scores = p[:, :4].astype(np.float32), p[:, 4].astype(np.float32)
                labels = [()] * len(p)
                if boxes_here:
                    g = np.array([b.box for b in boxes_here], np.float64)
                    iou = _box_iou(norm.astype(np.float64), g)
                    best = iou.argmax(1)
                    labels = [boxes_here[j].labels if iou[i, j] >= 0.5 else () for i, j in enumerate(best)]
            if len(norm) == 0:
                continue
            self.items.append((key[0], key[1], norm, labels, scores, src))

        # Frame counts per video; an unknown video is reported at the first line that names it.
        self.video_lengths: dict[str, int] = dict(video_lengths or {})
        given = set(self.video_lengths)
        for vid, ts, _, _, _, src in self.items:
            if vid not in self.video_lengths:
                n = count_frames(self.frame_root, vid, frame_pattern, frame_start)
                if n == 0:
                    raise FileNotFoundError(
                        f"{src}: unknown video {vid!r}: its first frame "
                        f"{frame_path(self.frame_root, vid, 0, frame_pattern, frame_start)} does not exist")
                self.video_lengths[vid] = self._past_gaps(vid, n)
            c = keyframe_index(ts, fps, video_start_sec)
            last = c + (self.num_frames - 1 - self.num_frames // 2) * self.sampling_rate  # the clip's last frame
            for probe in (last, c):
                if probe >= self.video_lengths[vid] and vid not in given and \
                        os.path.exists(frame_path(self.frame_root, vid, probe, frame_pattern, frame_start)):
                    # the count stopped at a gap (a lost file) before frames this clip needs: count on from
                    # there; a clip that needs a missing frame then fails alone, naming it, when loaded
                    self.video_lengths[vid] = self._past_gaps(
                        vid, count_frames(self.frame_root, vid, frame_pattern, frame_start, start=probe))
                    break
            if not 0 <= c < self.video_lengths[vid]:
                raise FileNotFoundError(
                    f"{src}: keyframe {vid},{ts:04d} is frame index {c}, outside video {vid!r} which "
                    f"has frames 0..{self.video_lengths[vid] - 1} "
                    f"({frame_path(self.frame_root, vid, max(c, 0), frame_pattern, frame_start)} missing)")

    #: Frames looked at past where a count stops: a gap this short (lost files) is not the video's end.
    GAP_PROBE = 64

    def _past_gaps(self, vid: str, n: int) -> int:
        """The frame count ``n`` extended past gaps of up to ``GAP_PROBE`` missing files: a clip near a lost
        file must fail naming it, not be clamped to the frame before it as if the video ended there."""
        while True:
            nxt = next((n + j for j in range(1, self.GAP_PROBE + 1) if os.path.exists(
                frame_path(self.frame_root, vid, n + j, self.frame_pattern, self.frame_start))), None)
            if nxt is None:
                return n
            n = count_frames(self.frame_root, vid, self.frame_pattern, self.frame_start, start=nxt)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def keyframes(self) -> list[tuple[str, int]]:
        """``(video_id, timestamp)`` of each item."""
        return [(it[0], it[1]) for it in self.items]

    def frame_indices(self, index: int) -> np.ndarray:
        """The clip's frame indices for item ``index``."""
        vid, ts = self.items[index][:2]
        c = keyframe_index(ts, self.fps, self.video_start_sec)
        return clip_frame_indices(c, self.num_frames, self.sampling_rate, self.video_lengths[vid])

    def load_frames(self, index: int) -> np.ndarray:
        """``uint8[T, H, W, 3]`` RGB frames of item ``index`` (repeated indices decoded once)."""
        vid, ts, *_, src = self.items[index]
        idx = self.frame_indices(index)
        decoded: dict[int, np.ndarray] = {}
        shape = None
        for i in idx.tolist():
            if i in decoded:
                continue
            path = frame_path(self.frame_root, vid, i, self.frame_pattern, self.frame_start)
            where = f"frame index {i} of video {vid!r}, needed by keyframe {vid},{ts:04d} of {src}"
            try:
                with Image.open(path) as im:
                    arr = np.asarray(im.convert("RGB"))
            except FileNotFoundError:
                raise FileNotFoundError(f"missing frame {path} ({where})") from None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise FrameReadError(f"unreadable JPEG {path} ({where}): {e}") from None
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise FrameReadError(f"frame {path} is {arr.shape[1]}x{arr.shape[0]} but other frames of the clip "
                                     f"are {shape[1]}x{shape[0]} ({where})")
            decoded[i] = arr
        return np.stack([decoded[i] for i in idx.tolist()])

    def __getitem__(self, index: int) -> dict:
        vid, ts, norm, labels, scores, _ = self.items[index]
        frames = self.load_frames(index)
        h, w = frames.shape[1:3]
        clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [T, 3, H, W], 0..255
        norm_t = torch.from_numpy(norm)
        boxes = norm_t * torch.tensor([w, h, w, h], dtype=torch.float32)
        clip, boxes, keep = self.transform(clip, boxes)
        onehot = torch.zeros(len(labels), self.num_classes)
        for r, labs in enumerate(labels):
            if labs:
                onehot[r, [a - 1 for a in labs]] = 1.0
        return {
            "clip": clip,
            "boxes": boxes[keep].float(),
            "labels": onehot[keep],
            "norm_boxes": norm_t[keep],
            "scores": torch.from_numpy(scores)[keep],
            "video_id": vid,
            "timestamp": int(ts),
        }

    def __repr__(self) -> str:
        n_boxes = sum(len(it[2]) for it in self.items)
        return (f"AVADataset(split={self.split!r}, {len(self)} keyframes, {n_boxes} boxes, "
                f"{len(self.video_lengths)} videos, T={self.num_frames}x{self.sampling_rate}, "
                f"root={self.frame_root!r})")


def ava_collate(batch: list[dict]) -> dict:
    """Batch AVA items with a variable number of boxes.

    Returns:
        ``clips``: ``float32 Tensor[B, 3, T, H, W]`` (items of different size zero-padded at bottom/right);
        ``rois``: ``float32 Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in pixels of ``clips``;
        ``labels``: ``float32 Tensor[K, C]``; ``scores``: ``float32 Tensor[K]``;
        ``boxes_per_clip``: ``int64 Tensor[B]``;
        ``meta``: K tuples ``(video_id, timestamp, norm_box float32 ndarray[4], box_score float)``, the
        inputs of :func:`stssa.evaluate.rows_from_predictions`.
    """
    if not batch:
        raise ValueError("ava_collate: empty batch")
    t_sizes = {b["clip"].shape[:2] for b in batch}
    if len(t_sizes) != 1:
        raise ValueError(f"ava_collate: clips differ in channels/frames: {sorted(t_sizes)}")
    h = max(b["clip"].shape[2] for b in batch)
    w = max(b["clip"].shape[3] for b in batch)
    c, t = batch[0]["clip"].shape[:2]
    clips = batch[0]["clip"].new_zeros((len(batch), c, t, h, w))
    rois, labels, scores, meta, counts = [], [], [], [], []
    for i, b in enumerate(batch):
        clips[i, :, :, :b["clip"].shape[2], :b["clip"].shape[3]] = b["clip"]
        n = len(b["boxes"])
        counts.append(n)
        rois.append(torch.cat([torch.full((n, 1), float(i)), b["boxes"].float()], dim=1))
        labels.append(b["labels"])
        scores.append(b["scores"])
        for box, s in zip(b["norm_boxes"].numpy(), b["scores"].tolist()):
            meta.append((b["video_id"], b["timestamp"], box.copy(), float(s)))
    return {
        "clips": clips,
        "rois": torch.cat(rois).reshape(-1, 5),
        "labels": torch.cat(labels),
        "scores": torch.cat(scores),
        "boxes_per_clip": torch.tensor(counts, dtype=torch.int64),
        "meta": meta,
    }
