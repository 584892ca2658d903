"""Run an action detector on videos: ``python -m stssa.infer --config CONFIG [--checkpoint CK] --video V [V ...]
[--boxes B.csv | --person-detector torchvision [--detector-weights W]] --out DIR [--every 1.0] [--topk 3]``.

For each video (its id is the file's stem) the video is decoded directly (no intermediate JPEGs) and
resampled by presentation time to the config's frame rate (``data.fps``, 30 by default) exactly as
``python -m stssa.data.frames`` does (:func:`stssa.data.video.resampled_frames`). Keyframes are the whole
multiples of ``--every`` seconds inside ``[--start, --end)`` (default: the whole video); around each one a
clip of ``data.num_frames`` frames ``data.sampling_rate`` apart is built as :class:`stssa.data.AVADataset`
builds it at validation (indices :func:`~stssa.data.ava.clip_frame_indices`, clamped to the segment's ends;
:class:`~stssa.data.transforms.TestTransform` to ``data.test_short_side``, default ``data.crop_size``), and
the clips are batched through the model (``--batch-size`` keyframes at a time, ``torch.inference_mode``,
the fused ops unless the config says otherwise, CPU or CUDA).

Person boxes, normalised ``(x1, y1, x2, y2)``, come from

* ``--boxes B.csv``: an AVA-format file, rows ``video_id,timestamp,x1,y1,x2,y2[,...]``: a proposals file
  (``...,score``, ``...,,score``, or the ``.pkl`` form; see :func:`stssa.data.read_proposals`), a detection file
  (``...,action_id,score``: each box once, at its best score), an annotation file
  (``...,action_id[,person_id]``: score 1) or bare boxes (6 columns); rows of other videos are ignored; or
* ``--person-detector torchvision``: torchvision's COCO Faster R-CNN (ResNet-50 FPN, v2 or v1) on each
  keyframe, persons only. Its weights are read from ``--detector-weights`` or from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``); nothing is downloaded, and without them the command stops with an error
  saying where it looked.

Boxes scoring below ``--box-threshold`` (default ``data.proposal_threshold``, else 0.8) are dropped.

Outputs in ``--out``:

* ``detections.csv``: ``video_id,timestamp,x1,y1,x2,y2,action_id,score`` for every box and class of the
  label map (the AVA detection form that ``python -m stssa.evaluate`` reads; timestamps are whole seconds
  unless ``--every`` is fractional, then seconds with 3 decimals);
* ``frames/{video_id}_{timestamp}.jpg``: each keyframe with its boxes and top ``--topk`` actions;
* ``{video_id}_annotated.mp4``: the resampled video, each frame showing the detections of the nearest
  keyframe (within half of ``--every``); ``--no-video`` skips it.

Small frames are enlarged by an integer factor for the pictures (short side at least ``--vis-short-side``,
360 by default) so that the captions are legible.

Without ``--checkpoint`` a randomly initialised model runs, with a warning (smoke tests). A training
checkpoint (``stssa.train``'s ``checkpoint.pt``) carries its config, so ``--config`` may then be left out.
A video that cannot be read gives one ``error:`` line naming it; the other videos are still processed and
the command exits with status 1 at the end.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from stssa._os import current_umask

__all__ = ["load_model", "read_person_boxes", "TorchvisionPersonDetector", "PersonDetectorUnavailable",
           "find_detector_weights", "infer_video", "render_outputs", "keyframe_times", "main"]


class PersonDetectorUnavailable(RuntimeError):
    """The torchvision person detector's weights are not on this machine."""


# --------------------------------------------------------------------------------------------- model
def load_model(config=None, checkpoint=None, overrides=(), device="cpu"):
    """Build the detector of ``config`` (path or name in ``stssa/configs``) and load ``checkpoint``.

    Returns ``(model in eval mode on device, config dict)``. A training checkpoint's own config is used when
    ``config`` is ``None``. Without a checkpoint the weights are random (seeded) and a warning says so.
    """
    from stssa.models import build_model
    from stssa.utils import load_checkpoint, load_config

    state, ck_cfg = None, None
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
        try:
            ck = load_checkpoint(checkpoint)
        except Exception as e:  # torch.load raises many types for a corrupt file
            raise ValueError(f"--checkpoint {checkpoint}: cannot read: {e}") from None
        if isinstance(ck, dict) and isinstance(ck.get("model"), dict):
            state, ck_cfg = ck["model"], ck.get("config")
        elif isinstance(ck, dict):
            state = ck
        else:
            raise ValueError(f"--checkpoint {checkpoint}: expected a state dict or a stssa.train checkpoint, "
                             f"got {type(ck).__name__}")
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if config is not None:
        cfg = load_config(config, overrides)
    elif ck_cfg is not None:
        import copy
        import tempfile

        import yaml
        # Apply overrides through load_config, which owns their syntax.
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(copy.deepcopy(ck_cfg), f)
        try:
            cfg = load_config(f.name, overrides)
        finally:
            os.unlink(f.name)
        cfg["name"] = ck_cfg.get("name", cfg["name"])
    else:
        raise ValueError("give --config (or a --checkpoint written by stssa.train, which holds its config)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg.get("model") or {}, load_pretrained=state is None)
    if state is None:
        warnings.warn("stssa.infer: no --checkpoint: running a randomly initialised model; its scores mean "
                      "nothing (smoke test)", stacklevel=2)
    else:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"--checkpoint {checkpoint} does not fit the model of config "
                             f"{cfg.get('name')!r}: {e}") from None
    return model.to(device).eval(), cfg


def _class_names(cfg: dict, labelmap=None) -> tuple[dict[int, str], list[int]]:
    """``({id: name}, ids to emit)``: ``labelmap`` if given, else the config's evaluation label map when the
    file exists, else every class ``1..num_classes`` with the AVA names."""
    from stssa.data.formats import _as_labelmap
    from stssa.data.labels import AVA_ACTIONS
    from stssa.train import _path
    names = {i: n for i, n, _ in AVA_ACTIONS}
    num_classes = int((cfg.get("model") or {}).get("num_classes", 80))
    if labelmap is None:
        d = cfg.get("data") or {}
        for key in ("eval_labelmap", "labelmap"):
            p = _path(d.get("root"), d.get(key))
            if p is not None and Path(p).is_file():
                labelmap = p
                break
    if labelmap is not None:
        lm_names, ids = _as_labelmap(labelmap)
        bad = [i for i in ids if not 1 <= i <= num_classes]
        if bad:
            raise ValueError(f"label map {labelmap}: ids {bad[:5]} outside the model's 1..{num_classes}")
        names.update(lm_names)
        return names, sorted(ids)
    return names, list(range(1, num_classes + 1))


# --------------------------------------------------------------------------------------------- boxes
def read_person_boxes(path, video_id: str, threshold: float = 0.0) -> dict[int, np.ndarray]:
    """Person boxes of one video from an AVA-format file (forms in the module docstring).

    Returns ``{timestamp: float32[N, 5]}`` rows ``(x1, y1, x2, y2, score)``, normalised, score-sorted, scores
    ``>= threshold``. Raises :class:`~stssa.data.formats.AVAFormatError` (``file:line``) on malformed rows
    and ``ValueError`` when the file has no row of ``video_id``.
    """
    from stssa.data.formats import (_check_boxes, _to_numbers, read_annotations, read_csv_columns,
                                    read_proposals)
    path = Path(path)
    if path.suffix in (".pkl", ".pickle"):
        allp = read_proposals(path, threshold)
    else:
        cols, lines, counts = read_csv_columns(path, (6, 7, 8), "columns (video_id,timestamp,x1,y1,x2,y2[,...])")

        def all_ints(col):
            return all(s.lstrip("-").isdigit() for s in col)

        if not len(lines):
            allp = {}
        elif (counts == 6).all():
            ts = _to_numbers(path, cols[1], lines, np.int64, "timestamp")
            boxes = np.stack([_to_numbers(path, cols[j], lines, np.float64, "box coordinate")
                              for j in range(2, 6)], 1)
            _check_boxes(path, boxes, lines)
            allp = {}
            for v, t, b in zip(cols[0], ts.tolist(), np.clip(boxes, 0, 1)):
                allp.setdefault((v, t), []).append([*b, 1.0])
            allp = {k: np.unique(np.array(v, np.float32), axis=0) for k, v in allp.items()}
        elif (counts == 8).all() and all_ints(cols[6]) and all_ints(cols[7]) or \
                (counts == 7).all() and all_ints(cols[6]) and cols[6] and not all(
                    0 <= int(s) <= 1 for s in cols[6]):
            # Annotation rows: video_id,timestamp,box,action_id[,person_id]; each person once, score 1.
            allp = {k: np.array([[*b.box, 1.0] for b in v], np.float32).reshape(-1, 5)
                    for k, v in read_annotations(path).items()}
        else:
            allp = read_proposals(path)  # proposals / detections: each box once, at its best score
    mine = {int(t): a[a[:, 4] >= threshold] for (v, t), a in allp.items() if v == video_id}
    if not mine:
        others = sorted({v for v, _ in allp})
        raise ValueError(f"--boxes {path}: no boxes for video {video_id!r} (the file has "
                         f"{', '.join(map(repr, others[:5]))}{', ...' if len(others) > 5 else ''})")
    return {t: a[np.argsort(-a[:, 4], kind="stable")].astype(np.float32) for t, a in mine.items()}


_TV_WEIGHTS = (("fasterrcnn_resnet50_fpn_v2", "FasterRCNN_ResNet50_FPN_V2_Weights"),
               ("fasterrcnn_resnet50_fpn", "FasterRCNN_ResNet50_FPN_Weights"))


def find_detector_weights(weights=None) -> Path:
    """The local weight file of the torchvision person detector: ``weights`` if given (it must exist), else
    the first of torchvision's COCO Faster R-CNN files (v2, then v1) in the torch hub cache."""
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise PersonDetectorUnavailable(f"--detector-weights {p}: no such file")
        return p
    try:
        import torchvision.models.detection as det
    except ImportError as e:
        raise PersonDetectorUnavailable("--person-detector torchvision needs torchvision (install the build that "
                                        f"matches your torch {torch.__version__}), or pass --boxes") from e
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    looked = []
    for _, enum in _TV_WEIGHTS:
        name = Path(getattr(det, enum).COCO_V1.url).name
        looked.append(cache / name)
        if (cache / name).is_file():
            return cache / name
    raise PersonDetectorUnavailable(
        "the torchvision person detector needs its COCO weights on this machine, and none were found: looked "
        f"for {' and '.join(map(str, looked))} (torch hub cache; set TORCH_HOME to move it). Nothing is "
        f"downloaded here: copy a file from {getattr(det, _TV_WEIGHTS[1][1]).COCO_V1.url} (or the v2 file) "
        "there or pass --detector-weights FILE, or give person boxes with --boxes CSV.")


class TorchvisionPersonDetector:
    """torchvision's COCO Faster R-CNN (ResNet-50 FPN; v2 or v1, whichever the weight file fits), persons only.

    ``detector(images: list of uint8 [H, W, 3]) -> list of float32[N, 5]`` normalised ``(x1, y1, x2, y2,
    score)`` with ``score >= threshold``, best first. ``min_size`` is torchvision's resize target (800).
    """

    def __init__(self, weights=None, threshold: float = 0.8, device="cpu", min_size: int = 800):
        import torchvision.models.detection as det
        path = find_detector_weights(weights)
        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt or foreign file
            raise PersonDetectorUnavailable(f"detector weights {path}: cannot read: {e}") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise PersonDetectorUnavailable(f"detector weights {path}: expected a state dict, got "
                                            f"{type(state).__name__}")
        # v2's RPN head has two convs (v1 one, saved as rpn.head.conv.weight in the COCO file, or
        # rpn.head.conv.0.0.weight by newer torchvision): the keys tell which model the file is for.
        builder = _TV_WEIGHTS[0][0] if "rpn.head.conv.1.0.weight" in state else _TV_WEIGHTS[1][0]
        model = getattr(det, builder)(weights=None, weights_backbone=None, num_classes=91,
                                      box_score_thresh=threshold, min_size=min_size)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise PersonDetectorUnavailable(f"detector weights {path} do not fit torchvision's {builder} (COCO): "
                                            f"{str(e).splitlines()[0]}") from None
        self.arch, self.path, self.threshold = builder, path, float(threshold)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, images) -> list[np.ndarray]:
        if not images:
            return []
        tensors = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).to(self.device).float() / 255
                   for im in images]
        out = []
        for im, det in zip(images, self.model(tensors)):
            h, w = im.shape[:2]
            keep = (det["labels"] == 1) & (det["scores"] >= self.threshold)  # COCO category 1: person
            b = det["boxes"][keep].float().cpu().numpy() / np.array([w, h, w, h], np.float32)
            s = det["scores"][keep].float().cpu().numpy()
            a = np.concatenate([np.clip(b, 0, 1), s[:, None]], 1).astype(np.float32).reshape(-1, 5)
            out.append(a[np.argsort(-a[:, 4], kind="stable")])
        return out


# ------------------------------------------------------------------------------------------ inference
def keyframe_times(start: Fraction, stop: Fraction, every: Fraction) -> list[Fraction]:
    """Whole multiples of ``every`` in ``[start, stop)``."""
    m0 = math.ceil(start / every)
    out = []
    m = m0
    while m * every < stop:
        out.append(m * every)
        m += 1
    return out


def _format_ts(t: Fraction) -> str:
    return f"{int(t):04d}" if t.denominator == 1 else f"{float(t):.3f}"


def infer_video(model, cfg: dict, video, boxes_for: Callable, every=1, start=None, end=None, batch_size: int = 8,
                device="cpu", progress: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Detections on one video.

    Args:
        model: an :class:`~stssa.models.ActionDetector` (eval mode) on ``device``.
        cfg: its config (the ``data`` section gives ``fps``, ``num_frames``, ``sampling_rate``,
            ``test_short_side`` / ``crop_size``).
        video: the file.
        boxes_for: ``boxes_for(keyframes) -> list of float32[N, 5]``: person boxes (normalised, with score)
            for a list of ``(time Fraction, full-size frame uint8[H, W, 3])``.
        every, start, end: keyframes at the whole multiples of ``every`` seconds in ``[start, end)``; the
            clip's frames are clamped to ``[start, end)`` (default: the whole video).
        batch_size: keyframes per forward pass.

    Returns:
        One dict per keyframe, in time order: ``time`` (Fraction), ``index`` (frame index in the resampled
        segment), ``boxes`` float32[N, 5] (normalised + box score) and ``probs`` float32[N, num_classes]
        (sigmoid scores; column ``c`` is action ``c + 1``).
    """
    from stssa.data.ava import AVA_MEAN, AVA_STD, ava_collate, clip_frame_indices
    from stssa.data.transforms import TestTransform, resize
    from stssa.data.video import as_fraction, resampled_frames, output_size

    d = cfg.get("data") or {}
    fps = as_fraction(d.get("fps", 30))
    T, rate = int(d.get("num_frames", 32)), int(d.get("sampling_rate", 2))
    short = int(d.get("test_short_side") or d.get("crop_size", 256))
    transform = TestTransform(short, AVA_MEAN, AVA_STD)
    every = as_fraction(every)
    step = every * fps
    if every <= 0 or step.denominator != 1:
        raise ValueError(f"--every {float(every):g} s must be a positive whole number of frames at {fps} fps")
    step = int(step)
    lo_off, hi_off = (T // 2) * rate, (T - 1 - T // 2) * rate

    results: list[dict] = []
    frames: dict[int, torch.Tensor] = {}   # resized float frames [3, h, w] still needed by a clip
    pending: list[dict] = []               # keyframes waiting for their clip's last frame
    ready: list[dict] = []
    seg_start = None
    c0 = None                              # frame index of the first keyframe
    n_seen = 0
    last = None                            # (index, full-size frame) of the latest frame

    def needed(i: int) -> bool:
        # Frame i is in some keyframe's clip: c - lo_off <= i <= c + hi_off with (i - c) % rate == 0.
        if c0 is None:
            return False
        if i == 0:
            return True  # clips of early keyframes clamp to frame 0
        m_lo = max(0, math.ceil((i - hi_off - c0) / step))
        m_hi = math.floor((i + lo_off - c0) / step)
        return any((i - (c0 + m * step)) % rate == 0 for m in range(m_lo, m_hi + 1))

    def run(batch: list[dict]) -> None:
        need = [k for k in batch if k["boxes"] is None]
        for k, b in zip(need, boxes_for([(k["time"], k.pop("image")) for k in need])):
            k["boxes"] = np.asarray(b, np.float32).reshape(-1, 5)
        items = []
        for k in batch:
            k.pop("image", None)
            clip = k.pop("clip")
            if len(k["boxes"]) == 0:
                k["probs"] = np.zeros((0, int((cfg.get("model") or {}).get("num_classes", 80))), np.float32)
                continue
            h, w = clip.shape[-2:]
            px = torch.from_numpy(k["boxes"][:, :4].copy()) * torch.tensor([w, h, w, h], dtype=torch.float32)
            c, b, _ = transform(clip, px)
            items.append((k, {"clip": c, "boxes": b.float(), "labels": torch.zeros(len(b), 1),
                              "norm_boxes": torch.from_numpy(k["boxes"][:, :4].copy()),
                              "scores": torch.from_numpy(k["boxes"][:, 4].copy()),
                              "video_id": "", "timestamp": 0}))
        if items:
            batch_t = ava_collate([it for _, it in items])
            with torch.inference_mode():
                logits = model(batch_t["clips"].to(device), batch_t["rois"].to(device))
            probs = torch.sigmoid(logits.float()).cpu().numpy()
            offs = np.cumsum([0] + batch_t["boxes_per_clip"].tolist())
            for j, (k, _) in enumerate(items):
                k["probs"] = probs[offs[j]:offs[j + 1]]
        results.extend(batch)

    def take_clip(k: dict, n_total: Optional[int]) -> None:
        idx = clip_frame_indices(k["index"], T, rate, n_total if n_total is not None else 1 << 62)
        k["clip"] = torch.stack([frames[i] for i in idx.tolist()])  # [T, 3, h, w], 0..255

    size = None
    for i, t, frame in resampled_frames(video, fps, start, end):
        if seg_start is None:
            seg_start = t
            first_kf = keyframe_times(seg_start, seg_start + every + 1, every)[0]
            c0 = int((first_kf - seg_start) * fps)
            if (first_kf - seg_start) * fps != c0:
                raise ValueError(f"--start {float(seg_start):g} s is not on the 1/{fps} s frame grid")
            size = output_size(frame.shape[0], frame.shape[1], short)
        n_seen = i + 1
        last = (i, frame)
        if needed(i):
            ft = torch.from_numpy(frame).permute(2, 0, 1).float()[None]
            frames[i] = resize(ft, torch.zeros(0, 4), size)[0][0]
        if i >= c0 and (i - c0) % step == 0:
            kf = {"time": t, "index": i, "boxes": None, "image": frame.copy()}
            pending.append(kf)
        # Clips whose last frame has arrived.
        while pending and pending[0]["index"] + hi_off <= i:
            k = pending.pop(0)
            take_clip(k, None)
            ready.append(k)
        if len(ready) >= batch_size:
            run(ready)
            ready = []
        # Frames no clip can use any more.
        low = (pending[0]["index"] if pending else c0 + (((i - c0) // step) + 1) * step) - lo_off
        for j in [j for j in frames if j < low and j != 0]:
            del frames[j]
        if progress is not None:
            progress(1)
    if seg_start is None:
        return []
    # End of the segment: the remaining clips clamp to its last frame.
    if pending and (n_seen - 1) not in frames:
        ft = torch.from_numpy(last[1]).permute(2, 0, 1).float()[None]
        frames[n_seen - 1] = resize(ft, torch.zeros(0, 4), size)[0][0]
    for k in pending:
        take_clip(k, n_seen)
        ready.append(k)
    for s in range(0, len(ready), batch_size):
        run(ready[s:s + batch_size])
    results.sort(key=lambda k: k["time"])
    return results


def detection_rows(video_id: str, keyframes: list[dict], class_ids) -> list[tuple]:
    """Rows ``(video_id, timestamp, x1, y1, x2, y2, action_id, score)`` for every box and class id."""
    from stssa.evaluate import rows_from_predictions
    rows = []
    for k in keyframes:
        if len(k["boxes"]) == 0:
            continue
        ts = k["time"]
        meta = [(video_id, 0, b[:4], float(b[4])) for b in k["boxes"]]
        for r in rows_from_predictions(meta, k["probs"], class_ids=class_ids):
            rows.append((r[0], ts) + r[2:])
    return rows


def write_rows(path, rows) -> int:
    """Write detection rows; whole-second timestamps through :func:`stssa.evaluate.write_detections_csv`
    (the AVA form), fractional ones with 3 decimals. Atomic: a temporary file then ``os.replace``, so an
    interrupted run leaves the previous file whole."""
    import tempfile

    from stssa.evaluate import write_detections_csv
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if all(Fraction(r[1]).denominator == 1 for r in rows):
            n = write_detections_csv(tmp, [(r[0], int(r[1])) + tuple(r[2:]) for r in rows])
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                for v, t, x1, y1, x2, y2, a, s in rows:
                    f.write(f"{v},{float(t):.3f},{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f},{int(a)},{float(s):.6g}\n")
            n = len(rows)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n


def render_outputs(video, video_id: str, keyframes: list[dict], out_dir, fps, every, names: dict, class_ids,
                   topk: int = 3, start=None, end=None, write_video: bool = True,
                   min_short_side: int = 360) -> dict:
    """Annotated keyframes ``out_dir/frames/{video_id}_{ts}.jpg`` and video ``out_dir/{video_id}_annotated.mp4``.

    The video is decoded a second time (full size, the same resampling); each frame shows the detections of
    the nearest keyframe within ``every / 2``. Returns ``{"keyframes": [paths], "video": path or None}``.
    """
    from PIL import Image

    from stssa.data.video import VideoWriter, as_fraction, resampled_frames
    from stssa.visualize import draw_detections, vis_scale

    out_dir = Path(out_dir)
    (out_dir / "frames").mkdir(parents=True, exist_ok=True)
    fps, every = as_fraction(fps), as_fraction(every)
    ids = np.array(sorted(class_ids), dtype=np.int64)
    by_index = {k["index"]: k for k in keyframes}
    half = int(every * fps) // 2

    def captions(k):
        caps = []
        for row in k["probs"]:
            sel = row[ids - 1]
            order = np.argsort(-sel, kind="stable")[:topk]
            caps.append([f"{names.get(int(ids[o]), str(ids[o]))} {sel[o]:.2f}" for o in order])
        return caps

    cache = {k["index"]: captions(k) for k in keyframes}
    kf_index = sorted(by_index)
    paths, writer, video_path, scale = [], None, None, None
    try:
        for i, t, frame in resampled_frames(video, fps, start, end):
            if scale is None:
                scale = vis_scale(frame.shape[0], frame.shape[1], min_short_side)
                if write_video:
                    video_path = out_dir / f"{video_id}_annotated.mp4"
                    writer = VideoWriter(video_path, fps, start_time=t, crf=20, preset="veryfast")
            # The nearest keyframe (the later one on a tie), if within half the keyframe spacing.
            j = np.searchsorted(kf_index, i)
            near = [kf_index[m] for m in (j - 1, j) if 0 <= m < len(kf_index)]
            near = [c for c in near if abs(c - i) <= half]
            k = by_index[max(near, key=lambda c: (-abs(c - i), c))] if near else None
            if k is not None and len(k["boxes"]):
                img = draw_detections(frame, k["boxes"][:, :4], cache[k["index"]], scale=scale)
            else:
                img = np.repeat(np.repeat(frame, scale, 0), scale, 1) if scale > 1 else frame
            if i in by_index:
                p = out_dir / "frames" / f"{video_id}_{_format_ts(by_index[i]['time'])}.jpg"
                Image.fromarray(img).save(p, format="JPEG", quality=92)
                paths.append(str(p))
            if writer is not None:
                writer.write(img[: img.shape[0] // 2 * 2, : img.shape[1] // 2 * 2])  # H.264 4:2:0: even sizes
    finally:
        if writer is not None:
            writer.close()
    return {"keyframes": paths, "video": None if video_path is None else str(video_path)}


# -------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stssa.infer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (path or a name in stssa/configs); default: the checkpoint's")
    p.add_argument("--checkpoint", help="stssa.train checkpoint or a state dict (default: random weights)")
    p.add_argument("--video", nargs="+", required=True, help="video file(s); the video id is the file's stem")
    p.add_argument("--out", required=True, help="output folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--boxes", help="person boxes: AVA-format CSV (or proposals .pkl), normalised")
    src.add_argument("--person-detector", choices=["torchvision"], help="detect persons on each keyframe")
    p.add_argument("--detector-weights", help="torchvision Faster R-CNN weights (default: the torch hub cache)")
    p.add_argument("--box-threshold", type=float, default=None,
                   help="drop boxes scoring below this (default: data.proposal_threshold, else 0.8)")
    p.add_argument("--every", type=Fraction, default=Fraction(1), help="seconds between keyframes (default 1)")
    p.add_argument("--start", type=Fraction, default=None, help="segment start (s); default: the video's start")
    p.add_argument("--end", type=Fraction, default=None, help="segment end (s); default: the video's end")
    p.add_argument("--topk", type=int, default=3, help="actions written on each box")
    p.add_argument("--batch-size", type=int, default=8, help="keyframes per forward pass")
    p.add_argument("--labelmap", help="classes written (default: the config's label map if present, else all)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--vis-short-side", type=int, default=360, help="pictures: enlarge small frames to this")
    p.add_argument("--no-video", action="store_true", help="do not write the annotated video")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.topk < 1 or a.batch_size < 1 or a.every <= 0:
        p.error("need --topk >= 1, --batch-size >= 1, --every > 0")
    if a.start is not None and a.end is not None and a.start >= a.end:
        p.error(f"need --start < --end, got {float(a.start):g} and {float(a.end):g}")
    stems = [Path(v).stem for v in a.video]
    dups = sorted({s for s in stems if stems.count(s) > 1})
    if dups:
        p.error(f"--video: the video id is the file's stem, and {dups} name(s) more than one file "
                "(their detections would merge under one id)")
    if a.detector_weights and not a.person_detector:
        p.error("--detector-weights goes with --person-detector torchvision")
    if a.threads is not None and a.threads < 1:
        p.error("need --threads >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        p.error(f"argument --device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"argument --device {a.device}: torch.cuda.is_available() is False (no GPU, or a CPU-only torch)")
    from tqdm import tqdm

    from stssa.data.formats import AVAFormatError
    from stssa.data.video import VideoReadError, as_fraction, probe_video
    try:
        model, cfg = load_model(a.config, a.checkpoint, a.set, device)
        names, class_ids = _class_names(cfg, a.labelmap)
        threshold = a.box_threshold if a.box_threshold is not None else \
            float((cfg.get("data") or {}).get("proposal_threshold", 0.8))
        detector = TorchvisionPersonDetector(a.detector_weights, threshold, device) if a.person_detector else None
    except (PersonDetectorUnavailable, FileNotFoundError, ValueError, AVAFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fps = as_fraction((cfg.get("data") or {}).get("fps", 30))
    # argument errors found once, before any video (they used to fail every video alike, exit 1)
    if (as_fraction(a.every) * fps).denominator != 1:
        print(f"error: --every {float(a.every):g} s must be a whole number of frames at {fps} fps", file=sys.stderr)
        return 2
    if a.start is not None:
        first_kf = math.ceil(a.start / a.every) * a.every
        if ((first_kf - a.start) * fps).denominator != 1:
            print(f"error: --start {float(a.start):g} s is not on the 1/{fps} s frame grid of the keyframes",
                  file=sys.stderr)
            return 2
    tables: dict[str, object] = {}  # video id -> its boxes, or the ValueError saying it has none
    if detector is None:
        for vid in stems:
            try:
                tables[vid] = read_person_boxes(a.boxes, vid, threshold)
            except ValueError as e:
                if isinstance(e, AVAFormatError):
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                tables[vid] = e
            except OSError as e:  # a missing or unreadable --boxes file: nothing can run
                print(f"error: --boxes {a.boxes}: {e}", file=sys.stderr)
                return 2
    from stssa.data.frames import expected_frame_count

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    all_rows, failed, t0 = [], [], time.perf_counter()
    for video, vid in zip(a.video, stems):
        try:
            if detector is not None:
                def boxes_for(kfs):
                    return detector([im for _, im in kfs])
            else:
                table = tables[vid]
                if isinstance(table, Exception):
                    raise table

                def boxes_for(kfs, table=table):
                    return [table.get(int(t), np.zeros((0, 5), np.float32)) if t.denominator == 1
                            else np.zeros((0, 5), np.float32) for t, _ in kfs]
            info = probe_video(video)
            lo = max(info.start, float(a.start)) if a.start is not None else info.start
            hi = min(info.end, float(a.end)) if a.end is not None and info.end is not None else (info.end or lo)
            decoded = [0]

            def progress(n, bar=None):
                decoded[0] += n
                bar.update(n)
            with tqdm(total=max(0, round((hi - lo) * float(fps))), unit="frame", desc=vid, disable=a.quiet,
                      dynamic_ncols=True) as bar:
                kfs = infer_video(model, cfg, video, boxes_for, a.every, a.start, a.end, a.batch_size, device,
                                  progress=lambda n, bar=bar: progress(n, bar))
            if not kfs:
                raise VideoReadError(f"{video}: no frame in the requested segment")
            # a file that stops decoding well before the end its video stream declares was cut short
            seg_lo = a.start if a.start is not None else as_fraction(round(info.start, 6))
            expected = expected_frame_count(info, fps, seg_lo, a.end) if info.duration_of_stream else None
            if expected is not None and decoded[0] < expected - math.ceil(fps):
                raise VideoReadError(f"{video}: decoding stopped after {decoded[0]} frames, but the video stream "
                                     f"says the segment holds {expected} (truncated or corrupt file?)")
            rows = detection_rows(vid, kfs, class_ids)
            vis = render_outputs(video, vid, kfs, out, fps, a.every, names, class_ids, a.topk, a.start, a.end,
                                 write_video=not a.no_video, min_short_side=a.vis_short_side)
            n_boxes = sum(len(k["boxes"]) for k in kfs)
            print(f"{vid}: {len(kfs)} keyframes, {n_boxes} boxes, {len(rows)} detection rows; "
                  f"{len(vis['keyframes'])} pictures" + (f", {vis['video']}" if vis["video"] else ""))
            if detector is None and n_boxes == 0:
                ts = sorted(table)
                print(f"warning: {vid}: no box of {a.boxes} falls on a keyframe (keyframes "
                      f"{float(kfs[0]['time']):g}..{float(kfs[-1]['time']):g} s every {float(a.every):g} s; the "
                      f"file's timestamps for {vid}: " + (f"{ts[0]}..{ts[-1]}" if ts else "none") + ")",
                      file=sys.stderr)
            all_rows.extend(rows)
            write_rows(out / "detections.csv", all_rows)  # after every video: a later failure loses nothing
        except Exception as e:  # one line per failed video; the others go on
            msg = str(e).replace("\n", " ") or type(e).__name__
            failed.append(msg)
            print(f"error: {msg if str(video) in msg else f'{video}: {msg}'}", file=sys.stderr)
    ok = len(a.video) - len(failed)
    if ok == 0:
        print(f"no video succeeded: {out / 'detections.csv'} not written", file=sys.stderr)
        return 1
    print(f"wrote {len(all_rows)} rows to {out / 'detections.csv'} ({ok} videos ok, {len(failed)} failed) in "
          f"{time.perf_counter() - t0:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
