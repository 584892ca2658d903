"""Video files -> AVA frame folders: ``python -m stssa.data.frames --videos DIR --out DIR [--fps 30]
[--start 900] [--end 1800] [--short-side N] [--workers N] [--quality Q] [--overwrite]``.

Every video in ``--videos`` (a folder, searched for the extensions in
:data:`stssa.data.video.VIDEO_EXTENSIONS`, or one file) becomes ``OUT/{video_id}/{video_id}_{n:06d}.jpg``
with ``video_id`` the file's stem: ``n = 1, 2, ...`` from second ``--start`` up to (not including) second
``--end`` or the end of the video, resampled by presentation time to exactly ``--fps``: file ``n`` shows the
source frame on screen at ``start + (n - 1) / fps`` (:func:`stssa.data.video.resampled_frames`), whatever the
source's frame rate. That is the layout :class:`stssa.data.AVADataset` reads, in which the keyframe at
second ``s`` is frame index ``(s - 900) * 30`` (file ``(s - 900) * 30 + 1``). ``--short-side`` resizes keeping
the aspect ratio (PySlowFast's AVA frames are full size; the dataset resizes at load time).

Resumable. Each JPEG is written to a temporary file and renamed, so a killed run leaves only whole frames;
``OUT/{video_id}/.frames.json`` records the parameters and, once a video is done, its frame count. A video
whose folder holds its full frame count is skipped; a partly written one continues after its last frame
(with the same parameters; different ones are an error unless ``--overwrite``). A folder of frames made by
another tool is skipped when it holds the full count ``(end - start) * fps``.

Errors: a corrupt or unreadable video (including one whose decoding stops well before the end its container
declares, or that has no decodable frame for more than ``--max-gap`` seconds), or one that ends before
``--start``, prints one line
``error: <file>: <reason>`` and the other videos are still processed; the command exits with status 1 at the
end if any video failed (2 for bad arguments).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Optional

from stssa._os import current_umask

__all__ = ["extract_video", "find_videos", "expected_frame_count", "main"]

MARKER = ".frames.json"


def find_videos(src) -> list[Path]:
    """The video files of a folder (sorted; by extension, case-insensitive), or ``[src]`` for a file."""
    from stssa.data.video import VIDEO_EXTENSIONS
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"--videos {src}: no such file or folder")
    return sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def expected_frame_count(info, fps, start, end) -> Optional[int]:
    """Frames in ``[start, min(end, video end))`` at ``fps`` from the container's duration (``None`` when the
    container gives no duration). ``info`` is a :class:`stssa.data.video.VideoInfo`."""
    from stssa.data.video import TIME_TOLERANCE, as_fraction
    if info.end is None:
        return None
    fps, start = as_fraction(fps), as_fraction(start)
    stop = as_fraction(round(info.end, 6)) - TIME_TOLERANCE
    if end is not None:
        stop = min(stop, as_fraction(end))
    return max(0, math.ceil((stop - start) * fps))


def _save_jpeg(arr, path: Path, quality: int) -> None:
    from PIL import Image
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(arr).save(f, format="JPEG", quality=quality)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would outlive the rename
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_marker(vdir: Path, doc: dict) -> None:
    tmp = vdir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, vdir / MARKER)


def extract_video(path, out_root, fps=30, start=900, end=1800, short_side: Optional[int] = None,
                  quality: int = 95, overwrite: bool = False, progress=None, max_gap=1) -> dict:
    """Extract one video's frames (layout, resume and skip rules in the module docstring).

    Args:
        path: the video file; its stem is the video id.
        out_root: frames root (``out_root/{video_id}/{video_id}_{n:06d}.jpg``).
        fps, start, end: output rate and time range in seconds (``end=None``: to the end of the video).
        short_side: resize so that the short side has this many pixels (``None``: source size).
        quality: Pillow JPEG quality.
        overwrite: replace frames written with other parameters.
        progress: optional callable ``progress(n_new_frames)``.
        max_gap: seconds without a decodable frame taken as corruption (``None``: no limit); see
            :func:`stssa.data.video.resampled_frames`.

    Returns:
        ``{"video_id", "status": "done" | "skipped", "frames": count, "written": frames written now}``.

    Raises:
        VideoReadError: the video cannot be opened or decoded (names the file).
        FileExistsError: the folder holds frames of other parameters and ``overwrite`` is False.
    """
    from stssa.data.ava import count_frames, frame_path  # file naming shared with the dataset
    from stssa.data.video import VideoReadError, as_fraction, probe_video, resampled_frames

    path = Path(path)
    vid = path.stem
    out_root = Path(out_root)
    vdir = out_root / vid
    params = {"fps": str(as_fraction(fps)), "start": str(as_fraction(start)),
              "end": None if end is None else str(as_fraction(end)), "short_side": short_side, "quality": quality}
    info = probe_video(path)
    marker = vdir / MARKER
    have = count_frames(out_root, vid) if vdir.is_dir() else 0
    first = 0
    if marker.exists():
        try:
            doc = json.loads(marker.read_text())
        except (OSError, ValueError):
            doc = {}
        if doc.get("params") != params:
            if not overwrite:
                raise FileExistsError(f"{vdir} holds frames made with other parameters ({doc.get('params')}); "
                                      f"delete it or pass --overwrite")
            have = 0
        elif doc.get("complete") and doc.get("frames") == have:
            return {"video_id": vid, "status": "skipped", "frames": have, "written": 0}
        else:
            first = have  # continue after the last whole frame
    elif have:
        full = expected_frame_count(info, fps, start, end)
        if full is not None and have == full:
            return {"video_id": vid, "status": "skipped", "frames": have, "written": 0}
        if not overwrite:
            raise FileExistsError(f"{vdir} holds {have} frames (expected {full}) and no {MARKER}: made by "
                                  f"another tool or run; delete it or pass --overwrite")
        have = 0
    if first == 0 and vdir.is_dir():
        for p in vdir.glob(f"{vid}_*.jpg"):  # stale frames must not be read as part of this extraction
            p.unlink()
    vdir.mkdir(parents=True, exist_ok=True)
    _write_marker(vdir, {"source": str(path), "params": params, "complete": False})

    written, n = 0, first
    pending = 0
    if progress is not None and first:
        progress(first)  # frames kept from the interrupted run
    for n, _, frame in resampled_frames(path, fps, start, end, short_side=short_side, first_index=first,
                                        max_gap=max_gap):
        _save_jpeg(frame, Path(frame_path(out_root, vid, n)), quality)
        written += 1
        pending += 1
        if progress is not None and pending >= 50:
            progress(pending)
            pending = 0
    if progress is not None and pending:
        progress(pending)
    total = first + written
    if total == 0:
        raise VideoReadError(f"{path}: no frame in [{float(as_fraction(start)):g}, "
                             f"{'end' if end is None else f'{float(as_fraction(end)):g}'}) s: the video spans "
                             f"{info.start:.3f} .. {info.end if info.end is not None else float('nan'):.3f} s")
    # A file that stops decoding well before the end its container declares was cut short (a broken
    # download): say so rather than mark it complete. Only the video stream's own duration tells (the
    # file's covers the longest stream, and an audio track can outlast the video).
    expected = expected_frame_count(info, fps, start, end) if info.duration_of_stream else None
    if expected is not None and total < expected - math.ceil(as_fraction(fps)):
        raise VideoReadError(f"{path}: decoding stopped after {total} frames, but the container says the "
                             f"range holds {expected} (truncated or corrupt file?)")
    _write_marker(vdir, {"source": str(path), "params": params, "complete": True, "frames": total})
    return {"video_id": vid, "status": "done", "frames": total, "written": written}


def _worker(args) -> tuple[str, Optional[dict], Optional[str]]:
    path, kwargs, queue = args
    try:
        return str(path), extract_video(path, progress=queue.put if queue is not None else None, **kwargs), None
    except Exception as e:  # one line per failed video; the others go on
        return str(path), None, _one_line(e, path)


def _one_line(e: Exception, path) -> str:
    msg = str(e).replace("\n", " ")
    return msg if str(path) in msg else f"{path}: {type(e).__name__}: {msg}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stssa.data.frames", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="folder of videos (or one video file)")
    p.add_argument("--out", required=True, help="frames root: OUT/{video_id}/{video_id}_%%06d.jpg")
    p.add_argument("--fps", type=Fraction, default=Fraction(30), help="output frame rate (default 30)")
    p.add_argument("--start", type=Fraction, default=Fraction(900), help="first second (default 900, AVA)")
    p.add_argument("--end", type=str, default="1800",
                   help="stop before this second (default 1800, AVA); 'none': to the end of the video")
    p.add_argument("--short-side", type=int, default=None, help="resize so that the short side is N pixels")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument("--workers", type=int, default=1, help="videos decoded in parallel (processes)")
    p.add_argument("--overwrite", action="store_true", help="replace frames extracted with other parameters")
    p.add_argument("--max-gap", type=float, default=1.0,
                   help="seconds without a decodable frame that make a video corrupt (default 1; 0: no limit)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        end = None if a.end.lower() == "none" else Fraction(a.end)
    except (ValueError, ZeroDivisionError):
        p.error(f"argument --end: a number of seconds or 'none', got {a.end!r}")
    if a.fps <= 0 or a.workers < 1 or (a.short_side is not None and a.short_side < 1) \
            or not 1 <= a.quality <= 100 or (end is not None and end <= a.start) or not a.max_gap >= 0:
        p.error("need --fps > 0, --workers >= 1, --short-side >= 1, 1 <= --quality <= 100, --end > --start, "
                "--max-gap >= 0")
    try:
        videos = find_videos(a.videos)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not videos:
        print(f"error: no video files in {a.videos}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from stssa.data.video import VideoReadError, probe_video
    kwargs = {"out_root": a.out, "fps": a.fps, "start": a.start, "end": end, "short_side": a.short_side,
              "quality": a.quality, "overwrite": a.overwrite, "max_gap": a.max_gap or None}
    failed: list[str] = []
    stems: dict[str, Path] = {}
    todo, total = [], 0
    for v in videos:
        if v.stem in stems:  # two files would write one folder
            failed.append(f"{v}: video id {v.stem!r} is also the stem of {stems[v.stem]}; skipped")
            continue
        stems[v.stem] = v
        try:
            total += expected_frame_count(probe_video(v), a.fps, a.start, end) or 0
        except VideoReadError:
            pass  # reported once, by the extraction itself
        todo.append(v)
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    t0 = time.perf_counter()
    results = []
    bar = tqdm(total=total, unit="frame", disable=a.quiet, dynamic_ncols=True, desc="frames")
    with bar:
        def report(path, res, err):
            if err is not None:
                failed.append(err)
                bar.write(f"error: {err}", file=sys.stderr)
            else:
                results.append(res)
                if res["status"] == "skipped":
                    bar.update(res["frames"])
                bar.set_postfix(videos=f"{len(results) + len(failed)}/{len(videos)}")

        if a.workers == 1:
            for v in todo:
                report(*_worker((v, kwargs, _Updater(bar))))
        else:
            import multiprocessing as mp
            ctx = mp.get_context("spawn")  # no forked copies of the parent's decoder or thread state
            with ctx.Manager() as manager:
                queue = manager.Queue()
                with ProcessPoolExecutor(a.workers, mp_context=ctx) as ex:
                    futures = [ex.submit(_worker, (v, kwargs, queue)) for v in todo]
                    pending = set(futures)
                    while pending:
                        done = {f for f in pending if f.done()}
                        _drain(queue, bar)
                        for f in futures:
                            if f in done:
                                report(*f.result())
                        pending -= done
                        if pending:
                            time.sleep(0.05)
                    _drain(queue, bar)
    written = sum(r["written"] for r in results)
    skipped = sum(r["status"] == "skipped" for r in results)
    print(f"{len(results)} videos ok ({skipped} already complete), {len(failed)} failed; {written} frames written "
          f"in {time.perf_counter() - t0:.1f}s to {a.out}")
    return 1 if failed else 0


class _Updater:
    """``put(n)`` advances the bar: the in-process stand-in for the workers' queue."""

    def __init__(self, bar):
        self.bar = bar

    def put(self, n):
        self.bar.update(n)


def _drain(queue, bar) -> None:
    import queue as q
    while True:
        try:
            bar.update(queue.get_nowait())
        except q.Empty:
            return


if __name__ == "__main__":
    sys.exit(main())
