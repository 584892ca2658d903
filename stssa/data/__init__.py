"""AVA data: file formats, the clip dataset, transforms and a synthetic AVA-format dataset.

Public API (item and batch formats are documented in :mod:`stssa.data.ava`; file formats in
:mod:`stssa.data.formats`; the synthetic dataset in :mod:`stssa.data.synthetic`):

* ``read_labelmap(path) -> ({id: name}, {ids})`` (both pbtxt forms), ``read_annotations(csv,
  class_whitelist=None) -> {(video_id, ts): [AVABox]}``, ``read_exclusions(path) -> {(video_id, ts)}``,
  ``read_proposals(path, score_threshold) -> {(video_id, ts): float32[N, 5]}``.
* ``AVADataset(frame_root, annotation_csv, labelmap, split, num_frames, sampling_rate, crop_size,
  proposals, ...)`` and ``ava_collate(batch)``.
* ``AVA_ACTIONS`` / ``AVA_EVAL_IDS``: the 80 classes and the 60 evaluated ids.

The dataset names (which need torch and Pillow) are imported on first use, so that the file readers and the
evaluator (``python -m stssa.evaluate``) start without importing torch.
"""

from stssa.data.formats import (AVABox, AVAFormatError, make_image_key, read_annotations, read_exclusions,
                                read_labelmap, read_proposals)
from stssa.data.labels import AVA_ACTIONS, AVA_EVAL_IDS, AVA_NUM_CLASSES, labelmap_pbtxt

_LAZY = {"AVADataset", "ava_collate", "FrameReadError", "DEFAULT_FRAME_PATTERN", "keyframe_index",
         "clip_frame_indices", "count_frames", "frame_path"}

__all__ = sorted(_LAZY) + [
    "AVABox", "AVAFormatError", "make_image_key", "read_annotations", "read_exclusions", "read_labelmap",
    "read_proposals", "AVA_ACTIONS", "AVA_EVAL_IDS", "AVA_NUM_CLASSES", "labelmap_pbtxt",
]


def __getattr__(name):
    if name in _LAZY:
        from stssa.data import ava

        return getattr(ava, name)
    raise AttributeError(f"module 'stssa.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _LAZY)
