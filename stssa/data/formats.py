"""Readers for the AVA v2.2 file formats (numpy and the standard library only).

Formats (https://research.google.com/ava/download.html):

* Label map, ``.pbtxt`` in either official form::

      label { name: "bend/bow (at the waist)"  label_id: 1  label_type: PERSON_MOVEMENT }
      item { name: "bend/bow (at the waist)"  id: 1 }

  :func:`read_labelmap` returns ``({id: name}, {ids})``.
* Annotations, CSV rows ``video_id,timestamp,x1,y1,x2,y2,action_id,person_id`` (no header; boxes
  normalised to ``[0, 1]``; one row per label, so a person with three actions has three rows with the same
  box). :func:`read_annotations` merges the rows of one box into an :class:`AVABox` with several labels.
* Excluded timestamps, CSV rows ``video_id,timestamp``: :func:`read_exclusions`.
* Person proposals, either the pickled dict ``{"{video_id},{timestamp:04d}": ndarray[N, 5]}`` with rows
  ``[x1, y1, x2, y2, score]`` (normalised), or CSV rows ``video_id,timestamp,x1,y1,x2,y2[,action_id],score``
  (PySlowFast's ``ava_val_predicted_boxes.csv`` writes an empty action column): :func:`read_proposals`.

A keyframe is keyed by ``(video_id, timestamp)`` with ``timestamp`` an ``int`` (``"0902"`` and ``"902"`` are
the same keyframe, as in the official ``make_image_key``). Every error about file contents is a
:class:`AVAFormatError` whose message starts with ``path:line:``.
"""

from __future__ import annotations

import gc
import os
import pickle
import re
from collections import namedtuple
from itertools import repeat
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = [
    "AVAFormatError", "AVABox", "make_image_key", "read_labelmap", "read_annotations", "read_exclusions",
    "read_proposals", "proposals_from_dict", "read_csv_columns",
]


class AVAFormatError(ValueError):
    """Malformed AVA file; the message names ``file:line``."""


AVABox = namedtuple("AVABox", ["box", "labels", "person_id", "line"])
AVABox.__doc__ = """One annotated person box on one keyframe.

    box: ``(x1, y1, x2, y2)`` floats, normalised to ``[0, 1]``.
    labels: ``tuple[int, ...]`` action ids in file order, without repeats.
    person_id: ``int`` (``-1`` when the CSV has no person column).
    line: 1-based line of the box's first row in the CSV (for error messages).
"""


def make_image_key(video_id: str, timestamp) -> str:
    """The official key ``"{video_id},{timestamp:04d}"`` (used by proposal pickles and the evaluator)."""
    return f"{video_id},{int(timestamp):04d}"


def _fail(path, line, msg) -> AVAFormatError:
    return AVAFormatError(f"{path}:{line}: {msg}")


def _read_text(path) -> str:
    """The file as text: UTF-8, a leading byte-order mark dropped (spreadsheet exports write one, which
    would otherwise become part of the first video id), universal newlines."""
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise AVAFormatError(f"{path}: not UTF-8 text (a compressed or binary file?): {e}") from None


# --------------------------------------------------------------------------------------------- label map
_TOKEN = re.compile(
    r'(?P<ws>\s+)|(?P<comment>#[^\n]*)|(?P<open>\{)|(?P<close>\})'
    r'|(?P<field>[A-Za-z_]\w*)\s*:\s*(?P<value>"(?:[^"\\\n]|\\.)*"|[^\s{}"#]+)'
    r'|(?P<block>[A-Za-z_]\w*)\s*(?=\{)'
)


def read_labelmap(path) -> tuple[dict[int, str], set[int]]:
    """Read an AVA label map in either official ``.pbtxt`` form.

    Args:
        path: file in the ``label { name label_id label_type }`` form (``ava_action_list_v2.2.pbtxt``,
            80 classes) or the ``item { name id }`` form (``..._for_activitynet_2019.pbtxt``, 60 classes).

    Returns:
        ``(names, ids)``: ``{id: name}`` in file order and the ``set`` of ids.

    Raises:
        AVAFormatError: unparseable text, an entry without name or id, a repeated id.
    """
    text = _read_text(path)
    names: dict[int, str] = {}
    pos, line = 0, 1
    entry = None  # (start line, fields) of the open block
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _fail(path, line, f"cannot parse label map text near {text[pos:pos + 30]!r}")
        kind = m.lastgroup if m.lastgroup != "value" else "field"
        if kind == "block":
            if entry is not None:
                raise _fail(path, line, "nested block in label map")
            if m.group("block") not in ("label", "item"):
                raise _fail(path, line, f"expected a 'label {{' or 'item {{' block, got {m.group('block')!r}")
            entry = (line, {})
        elif kind == "open":
            if entry is None:
                raise _fail(path, line, "'{' without a 'label' or 'item' before it")
        elif kind == "field":
            if entry is None:
                raise _fail(path, line, f"field {m.group('field')!r} outside a label/item block")
            entry[1][m.group("field")] = (m.group("value"), line)
        elif kind == "close":
            if entry is None:
                raise _fail(path, line, "'}' without an open block")
            start, fields = entry
            raw_name = fields.get("name") or fields.get("display_name")
            raw_id = fields.get("label_id") or fields.get("id")
            if raw_name is None or raw_id is None:
                raise _fail(path, start, "label map entry needs a name and an id (or label_id)")
            name = raw_name[0]
            if not (len(name) >= 2 and name[0] == name[-1] == '"'):
                raise _fail(path, raw_name[1], f"name must be a quoted string, got {name}")
            try:
                class_id = int(raw_id[0])
            except ValueError:
                raise _fail(path, raw_id[1], f"id must be an integer, got {raw_id[0]!r}") from None
            if class_id in names:
                raise _fail(path, raw_id[1], f"class id {class_id} appears twice")
            names[class_id] = name[1:-1].replace('\\"', '"')
            entry = None
        line += m.group(0).count("\n")
        pos = m.end()
    if entry is not None:
        raise _fail(path, entry[0], "block is not closed")
    if not names:
        raise _fail(path, 1, "no label map entries")
    return names, set(names)


def _as_labelmap(labelmap) -> tuple[dict[int, str], set[int]]:
    """Accept a path, ``{id: name}``, ``(dict, set)`` or an iterable of ids."""
    if isinstance(labelmap, (str, os.PathLike)):
        return read_labelmap(labelmap)
    if isinstance(labelmap, tuple) and len(labelmap) == 2 and isinstance(labelmap[0], dict):
        labelmap = labelmap[0]
    try:
        if isinstance(labelmap, dict):
            return {int(k): str(v) for k, v in labelmap.items()}, {int(k) for k in labelmap}
        ids = sorted({int(i) for i in labelmap})
    except (TypeError, ValueError):
        raise ValueError(f"labelmap must be a label-map path, {{id: name}}, read_labelmap's (names, ids) or an "
                         f"iterable of integer ids, got {labelmap!r:.80}") from None
    return {i: str(i) for i in ids}, set(ids)


# ------------------------------------------------------------------------------------------------ CSVs
def read_csv_columns(path, ncols: Iterable[int], names: str = "columns"
                     ) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """Split a header-less CSV into string columns, fast (a million rows in about two seconds).

    Args:
        path: the file.
        ncols: the allowed numbers of columns (e.g. ``(7, 8)``); shorter rows get ``""`` in the missing
            trailing columns, so callers can tell a missing optional column.
        names: what a row should look like, for the error message.

    Returns:
        ``(columns, lines, counts)``: ``max(ncols)`` lists of stripped strings, ``int64[R]`` 1-based line
        numbers of the rows (blank lines are skipped) and ``int64[R]`` the number of columns of each row.

    Raises:
        AVAFormatError: a row with another number of columns, naming file and line.
    """
    allowed = sorted(set(ncols))
    width = allowed[-1]
    text = _read_text(path)
    has_space = " " in text or "\t" in text  # strip fields only when needed (it is a third of the time)
    lines = text.splitlines()
    del text
    counts = np.array(list(map(str.count, lines, repeat(",", len(lines)))), dtype=np.int64) + 1
    blank = counts == 1
    if blank.any():
        blank &= np.fromiter((not s.strip() for s in lines), dtype=bool, count=len(lines))
    good = np.isin(counts, allowed) | blank
    if not good.all():
        i = int(np.flatnonzero(~good)[0])
        raise _fail(path, i + 1, f"expected {' or '.join(map(str, allowed))} comma-separated {names}, "
                                 f"got {counts[i]}: {lines[i]!r}")
    keep = np.flatnonzero(~blank)
    if len(keep) != len(lines):
        lines = [lines[i] for i in keep]
        counts = counts[keep]
    # Joining and splitting once is ~3x faster than one split per row, and avoids a million small lists
    # (which also makes the cyclic GC run repeatedly; it is paused while the big lists are built).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if len(allowed) == 1 or (counts == width).all():
            flat = ",".join(lines).split(",") if lines else []
            cols = [flat[j::width] for j in range(width)]
        else:
            rows = [s.split(",") + [""] * (width - n) for s, n in zip(lines, counts.tolist())]
            cols = [[r[j] for r in rows] for j in range(width)]
    finally:
        if gc_was_enabled:
            gc.enable()
    if has_space:
        cols = [[s.strip() for s in c] for c in cols]
    return cols, keep + 1, counts


def _to_numbers(path, col: list[str], lines: np.ndarray, dtype, what: str) -> np.ndarray:
    """Convert a string column; on failure name the first bad row's line."""
    try:
        return np.array(col, dtype=dtype) if col else np.zeros(0, dtype)
    except (ValueError, OverflowError):
        conv = float if np.dtype(dtype).kind == "f" else int
        for s, line in zip(col, lines.tolist()):
            try:
                conv(s)
            except (ValueError, OverflowError):
                raise _fail(path, line, f"{what} must be {'a number' if conv is float else 'an integer'}, "
                                        f"got {s!r}") from None
        raise


def _check_boxes(path, boxes: np.ndarray, lines: np.ndarray) -> None:
    bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _fail(path, int(lines[i]), f"box (x1, y1, x2, y2) = {tuple(boxes[i].tolist())} must be finite with "
                                         "x1 <= x2 and y1 <= y2")


def read_annotations(csv_path, class_whitelist=None) -> dict[tuple[str, int], list[AVABox]]:
    """Read an AVA annotation CSV and merge the rows of each box.

    Args:
        csv_path: rows ``video_id,timestamp,x1,y1,x2,y2,action_id[,person_id]``.
        class_whitelist: if given, rows whose action id is not in it are dropped (a box whose actions are
            all dropped disappears).

    Returns:
        ``{(video_id, timestamp): [AVABox, ...]}`` in file order. Rows of one keyframe with the same box
        (coordinates equal as written) are one person: their action ids are merged into ``AVABox.labels``.
        Boxes are clipped to ``[0, 1]``.

    Raises:
        AVAFormatError: wrong column count, non-numeric field, ``x2 < x1`` or ``y2 < y1``.
    """
    cols, lines, _ = read_csv_columns(csv_path, (7, 8), "columns (video_id,timestamp,x1,y1,x2,y2,action_id,person_id)")
    ts = _to_numbers(csv_path, cols[1], lines, np.int64, "timestamp")
    boxes = np.stack([_to_numbers(csv_path, cols[j], lines, np.float64, "box coordinate") for j in range(2, 6)],
                     axis=1) if len(lines) else np.zeros((0, 4))
    actions = _to_numbers(csv_path, cols[6], lines, np.int64, "action_id")
    pid_col = cols[7]
    _check_boxes(csv_path, boxes, lines)
    boxes = np.clip(boxes, 0.0, 1.0)
    keep = np.ones(len(lines), bool) if class_whitelist is None else np.isin(actions, list(class_whitelist))
    out: dict[tuple[str, int], list[AVABox]] = {}
    index: dict[tuple, int] = {}
    for i in np.flatnonzero(keep).tolist():
        key = (cols[0][i], int(ts[i]))
        # The box as written identifies the person (rows of one person repeat the same numbers).
        bkey = (key, cols[2][i], cols[3][i], cols[4][i], cols[5][i])
        j = index.get(bkey)
        boxes_here = out.setdefault(key, [])
        if j is None:
            pid = pid_col[i]
            try:
                person_id = int(pid) if pid else -1
            except ValueError:
                raise _fail(csv_path, int(lines[i]), f"person_id must be an integer, got {pid!r}") from None
            index[bkey] = len(boxes_here)
            boxes_here.append(AVABox(tuple(boxes[i].tolist()), (int(actions[i]),), person_id, int(lines[i])))
        else:
            b = boxes_here[j]
            if actions[i] not in b.labels:
                boxes_here[j] = b._replace(labels=b.labels + (int(actions[i]),))
    return out


def read_exclusions(path) -> set[tuple[str, int]]:
    """Read an excluded-timestamps CSV (rows ``video_id,timestamp``) into ``{(video_id, timestamp)}``."""
    cols, lines, _ = read_csv_columns(path, (2,), "columns (video_id,timestamp)")
    ts = _to_numbers(path, cols[1], lines, np.int64, "timestamp")
    return {(v, int(t)) for v, t in zip(cols[0], ts.tolist())}


def _parse_key(path, key) -> tuple[str, int]:
    if isinstance(key, tuple) and len(key) == 2:
        return str(key[0]), int(key[1])
    if isinstance(key, str) and "," in key:
        vid, ts = key.rsplit(",", 1)
        try:
            return vid, int(ts)
        except ValueError:
            pass
    raise AVAFormatError(f"{path}: proposal key {key!r} is not of the form '{{video_id}},{{timestamp:04d}}'")


def read_proposals(path, score_threshold: float = 0.0) -> dict[tuple[str, int], np.ndarray]:
    """Read person proposals (detector boxes) and keep those scoring at least ``score_threshold``.

    Args:
        path: a pickle (``.pkl``/``.pickle``) of ``{"{video_id},{ts:04d}": array[N, 5]}`` with rows
            ``[x1, y1, x2, y2, score]``, or a CSV with rows ``video_id,timestamp,x1,y1,x2,y2[,action_id],score``
            (rows repeating a box, as in a per-action detection file, are merged keeping the highest score).
        score_threshold: keep boxes with ``score >= score_threshold``.

    Returns:
        ``{(video_id, timestamp): float32[N, 5]}``, boxes clipped to ``[0, 1]``, in descending score order;
        keyframes left with no box are kept with an empty ``[0, 5]`` array.
    """
    path = Path(path)
    out: dict[tuple[str, int], np.ndarray] = {}
    if path.suffix.lower() in (".pkl", ".pickle"):
        with open(path, "rb") as f:
            try:
                data = pickle.load(f)
            except Exception as e:  # pickle raises many types for a corrupt file
                raise AVAFormatError(f"{path}: cannot unpickle proposals: {e}") from e
        return proposals_from_dict(data, score_threshold, path)
    else:
        cols, lines, counts = read_csv_columns(path, (7, 8),
                                               "columns (video_id,timestamp,x1,y1,x2,y2[,action_id],score)")
        if not len(lines):
            return {}
        ts = _to_numbers(path, cols[1], lines, np.int64, "timestamp")
        boxes = np.stack([_to_numbers(path, cols[j], lines, np.float64, "box coordinate") for j in range(2, 6)], 1)
        # 7 columns: the score is the 7th; 8 columns: the 8th (the 7th is an optional action id).
        score_col = [b if n == 8 else a for a, b, n in zip(cols[6], cols[7], counts.tolist())]
        scores = _to_numbers(path, score_col, lines, np.float64, "score")
        _check_boxes(path, boxes, lines)
        best: dict[tuple[str, int], dict[tuple, float]] = {}
        for i in range(len(lines)):
            per_key = best.setdefault((cols[0][i], int(ts[i])), {})
            b = tuple(boxes[i].tolist())
            per_key[b] = max(per_key.get(b, -np.inf), float(scores[i]))
        for k, d in best.items():
            out[k] = np.array([list(b) + [s] for b, s in d.items()], dtype=np.float64).reshape(-1, 5)
    return _threshold_sort_clip(out, score_threshold)


def proposals_from_dict(data, score_threshold: float = 0.0, source="<proposals dict>"
                        ) -> dict[tuple[str, int], np.ndarray]:
    """:func:`read_proposals` for proposals already in memory: ``{"{video_id},{ts:04d}" or (video_id, ts):
    array[N, 5]}`` (rows ``[x1, y1, x2, y2, score]``), checked, thresholded, sorted and clipped the same
    way; ``source`` names them in errors (the file they came from)."""
    if not isinstance(data, dict):
        raise AVAFormatError(f"{source}: expected a dict of proposals, got {type(data).__name__}")
    out: dict[tuple[str, int], np.ndarray] = {}
    for key, arr in data.items():
        k = _parse_key(source, key)
        try:
            a = np.asarray(arr, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise AVAFormatError(f"{source}: proposals for key {key!r} are not a numeric N x 5 array: {e}") from None
        if a.size == 0:
            a = a.reshape(0, 5)
        if a.ndim != 2 or a.shape[1] != 5:
            raise AVAFormatError(f"{source}: proposals for key {key!r} must be an N x 5 array "
                                 f"[x1, y1, x2, y2, score], got shape {a.shape}")
        if not np.isfinite(a).all() or (a[:, 2] < a[:, 0]).any() or (a[:, 3] < a[:, 1]).any():
            raise AVAFormatError(f"{source}: proposals for key {key!r} hold a non-finite or inverted box")
        out[k] = a
    return _threshold_sort_clip(out, score_threshold)


def _threshold_sort_clip(out: dict, score_threshold: float) -> dict[tuple[str, int], np.ndarray]:
    result = {}
    for k, a in out.items():
        a = a[a[:, 4] >= score_threshold]
        a = a[np.argsort(-a[:, 4], kind="stable")]
        a[:, :4] = np.clip(a[:, :4], 0.0, 1.0)
        result[k] = a.astype(np.float32)
    return result
