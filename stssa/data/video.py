"""Video files in and out with PyAV: decoding resampled by presentation time to an exact frame rate, and
H.264 MP4 writing.

PyAV is pinned in ``requirements.txt``; its wheels ship their own FFmpeg libraries, so the frames this
module gives do not depend on an FFmpeg installed on the machine (AVA frame extraction with different
FFmpeg versions gives different frames, and so different mAP).

Resampling (:func:`resampled_frames`). Output frame ``i`` (0-based) is the source frame *on screen* at time
``start + i / fps``: the last decoded frame whose presentation time is ``<= start + i / fps``. Times are
exact fractions (``pts * time_base``), compared with a tolerance of 1 ms so that timestamps rounded to the
millisecond (Matroska, WebM) still land on the right frame. The last frame stays on screen for its duration
(``frame.duration``, else one frame at the stream's average rate). So a 25 fps source gives, at 30 fps, the
source frames ``floor(i * 25 / 30)``: every fifth one shown twice; a 60 fps source gives every other frame;
variable-rate sources are handled the same way. Frames are decoded in presentation order; a frame whose
timestamp does not increase is dropped (broken files). The display rotation tag (phone videos) is ignored.

This is what ``ffmpeg -ss START -i V -r FPS`` is meant to give, with the numbering made explicit: the AVA
convention (``stssa.data.ava``) is that frame file ``n`` (1-based) of a clip cut at second 900 shows
second ``900 + (n - 1) / 30``, so the keyframe at second ``s`` is frame index ``(s - 900) * 30``.

Errors: a file that cannot be opened, has no video stream or fails to decode raises
:class:`VideoReadError` naming the file.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

__all__ = ["VideoReadError", "VideoInfo", "probe_video", "resampled_frames", "output_size", "VideoWriter",
           "rgb_to_yuv420p",
           "write_video", "VIDEO_EXTENSIONS", "TIME_TOLERANCE"]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts")
TIME_TOLERANCE = Fraction(1, 1000)  # seconds: timestamps rounded to the millisecond still match
# A video whose first frame comes this much later than the requested start is refused rather than padded
# with copies of its first frame (e.g. --start 0 on a clip that begins at second 900).
MAX_LEADING_GAP = Fraction(1)


class VideoReadError(RuntimeError):
    """A video file cannot be opened or decoded; the message names the file."""


def _av():
    try:
        import av
    except ImportError as e:  # av is a pinned runtime dependency; say how to get it
        raise ImportError("stssa video I/O needs PyAV: pip install av (see requirements.txt)") from e
    return av


def as_fraction(x) -> Fraction:
    """Seconds as an exact fraction (``0.1`` means 1/10, not the nearest binary float)."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, int):
        return Fraction(x)
    return Fraction(str(x))


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video's first video stream (nothing is decoded).

    ``start``: presentation time of the first frame in seconds (0 for most files; 900 for the synthetic
    set's MP4s); ``duration``: seconds from ``start`` to the end, ``None`` when the container does not say;
    ``fps``: the stream's average frame rate, ``None`` when unknown; ``frames``: frame count if the container
    records it, else 0; ``duration_of_stream``: whether ``duration`` is the video stream's own (its header
    field or, in Matroska/WebM, its ``DURATION`` tag) rather than the whole file's, which covers the
    longest stream (an audio track can outlast the video).
    """

    path: str
    width: int
    height: int
    fps: Optional[float]
    start: float
    duration: Optional[float]
    frames: int
    codec: str
    duration_of_stream: bool = True

    @property
    def end(self) -> Optional[float]:
        return None if self.duration is None else self.start + self.duration


def _open(path):
    av = _av()
    try:
        container = av.open(os.fspath(path), "r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoReadError(f"{path}: cannot open video: {e}") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: no video stream")
    return container, container.streams.video[0]


def _stream_start(stream) -> Fraction:
    return Fraction(stream.start_time) * stream.time_base if stream.start_time is not None else Fraction(0)


def probe_video(path) -> VideoInfo:
    """Read a video's metadata (size, frame rate, start time, duration) without decoding."""
    container, stream = _open(path)
    try:
        start = _stream_start(stream)
        own = True
        if stream.duration is not None and stream.time_base is not None:
            duration = float(Fraction(stream.duration) * stream.time_base)
        elif (tagged := _tag_seconds(stream.metadata.get("DURATION"))) is not None:
            # Matroska keeps per-track durations as tags; ffmpeg's is the track's end time (00:15:02 for
            # frames from 900 s to 902 s), so a track that starts later is measured from its start
            duration = tagged - float(start) if tagged >= float(start) else tagged
        elif container.duration is not None:
            duration, own = container.duration / 1_000_000, False  # AV_TIME_BASE
        else:
            duration = None
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(str(path), int(stream.codec_context.width), int(stream.codec_context.height),
                         float(rate) if rate else None, float(start), duration, int(stream.frames or 0),
                         stream.codec_context.name, own)
    finally:
        container.close()


def _tag_seconds(tag) -> Optional[float]:
    """A ``DURATION`` tag ``HH:MM:SS.fraction`` in seconds (``None`` if absent or malformed)."""
    m = re.fullmatch(r"\s*(\d+):([0-5]\d):([0-5]\d(?:\.\d*)?)\s*", tag) if isinstance(tag, str) else None
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None


def output_size(height: int, width: int, short_side: Optional[int]) -> tuple[int, int]:
    """``(h, w)`` with the short side scaled to ``short_side`` (aspect ratio kept, rounded; ``None``: as is).

    The same rounding as :func:`stssa.data.transforms.short_side_size` (tested), without importing torch.
    """
    if short_side is None:
        return height, width
    if short_side <= 0:
        raise ValueError(f"short_side must be positive, got {short_side}")
    if height <= width:
        return short_side, max(1, int(round(width * short_side / height)))
    return max(1, int(round(height * short_side / width))), short_side


def resampled_frames(path, fps, start=None, end=None, *, short_side: Optional[int] = None,
                     size: Optional[tuple[int, int]] = None, first_index: int = 0, seek: bool = True,
                     max_gap=1) -> Iterator[tuple[int, Fraction, np.ndarray]]:
    """Decode ``path`` resampled to exactly ``fps`` frames per second of presentation time.

    Args:
        path: the video file.
        fps: output rate (``int``, ``float`` or ``Fraction``; ``29.97`` is read as ``2997/100``).
        start: time (s) of output frame 0; default: the first frame's time, rounded up to the ``1 / fps`` grid.
        end: stop before this time (s); default: the end of the video. Output frames lie in
            ``[start, min(end, video end))``.
        short_side, size: resize each frame so that its short side is ``short_side`` (aspect ratio kept), or to
            ``size = (h, w)``; area averaging when shrinking, bicubic when enlarging (FFmpeg's swscale).
        first_index: start at output frame ``first_index`` (to resume); the decoder seeks close to it.
        seek: allow seeking to the key frame before ``start`` instead of decoding from the beginning.
        max_gap: seconds between two decoded frames (inside the requested range) beyond which the file is
            taken as corrupt: FFmpeg skips undecodable data and resumes at the next key frame, which would
            otherwise show as the last good frame frozen for the whole gap. ``None`` allows any gap.

    Yields:
        ``(i, t, frame)``: output index ``i = first_index, first_index + 1, ...``, its time
        ``t = start + i / fps`` (``Fraction``, seconds) and ``uint8 ndarray[H, W, 3]`` RGB.

    Raises:
        VideoReadError: the file cannot be opened or decoded, its first frame comes more than a second
            after ``start``, or frames are missing for more than ``max_gap`` (naming the file).
    """
    fps = as_fraction(fps)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if first_index < 0:
        raise ValueError(f"first_index must be >= 0, got {first_index}")
    av = _av()
    container, stream = _open(path)
    stream.thread_type = "AUTO"  # frame threads; frames still come out in presentation order
    tb = stream.time_base
    rate = stream.average_rate or stream.guessed_rate
    default_step = Fraction(1) / Fraction(rate) if rate else Fraction(1, 30)
    w0, h0 = int(stream.codec_context.width), int(stream.codec_context.height)
    if size is not None:
        oh, ow = int(size[0]), int(size[1])
    elif short_side is not None and w0 > 0 and h0 > 0:
        oh, ow = output_size(h0, w0, int(short_side))
    else:
        oh = ow = None
    start_f = None if start is None else as_fraction(start)
    end_f = None if end is None else as_fraction(end)
    gap_f = None if max_gap is None else as_fraction(max_gap)
    tol = TIME_TOLERANCE

    def convert(frame) -> np.ndarray:
        if oh is None or (frame.width, frame.height) == (ow, oh):
            return frame.to_ndarray(format="rgb24")
        interp = "AREA" if ow * oh < frame.width * frame.height else "BICUBIC"
        return frame.to_ndarray(format="rgb24", width=ow, height=oh, interpolation=interp)

    try:
        did_seek = False
        if seek and start_f is not None:
            target = start_f + Fraction(first_index) / fps - 1  # a second early: the frame on screen then
            if target - _stream_start(stream) > 2:
                try:
                    container.seek(int(math.floor(target / tb)), stream=stream, backward=True, any_frame=False)
                    did_seek = True
                except av.FFmpegError:
                    pass  # decode from the beginning
        n = first_index
        prev_t, prev_frame, prev_arr, prev_dur = None, None, None, default_step
        decoded_any = False
        for frame in container.decode(stream):
            if frame.pts is None:
                if prev_t is None:
                    continue
                t = prev_t + prev_dur
            else:
                t = Fraction(frame.pts) * tb
            if prev_t is not None and t <= prev_t:
                continue
            if not decoded_any:
                decoded_any = True
                if start_f is None:
                    start_f = Fraction(math.ceil((t - tol) * fps)) / fps
                target = start_f + Fraction(n) / fps
                if did_seek and t > target + tol:
                    # The seek overshot (some demuxers land after the key frame asked for): decode from 0.
                    container.close()
                    yield from resampled_frames(path, fps, start_f, end_f, short_side=short_side, size=size,
                                                first_index=first_index, seek=False, max_gap=max_gap)
                    return
                if t > target + MAX_LEADING_GAP:
                    raise VideoReadError(f"{path}: the video's first frame is at {float(t):.3f} s, more than "
                                         f"{float(MAX_LEADING_GAP):g} s after the requested start "
                                         f"{float(target):.3f} s")
            target = start_f + Fraction(n) / fps
            if gap_f is not None and prev_t is not None and t - prev_t > gap_f and t > target \
                    and (end_f is None or prev_t < end_f):
                raise VideoReadError(f"{path}: no decodable frame between {float(prev_t):.3f} s and {float(t):.3f} s "
                                     f"(corrupt or missing data)")
            # Every output time before this frame's (less the tolerance) shows the previous frame.
            while prev_t is not None and t > target + tol:
                if end_f is not None and target >= end_f:
                    return
                if prev_arr is None:
                    prev_arr = convert(prev_frame)
                yield n, target, prev_arr
                n += 1
                target = start_f + Fraction(n) / fps
            if end_f is not None and target >= end_f:
                return
            dur = Fraction(frame.duration) * tb if frame.duration else None
            prev_t, prev_frame, prev_arr = t, frame, None
            prev_dur = dur if dur else default_step
        if prev_t is None:
            raise VideoReadError(f"{path}: no frame could be decoded")
        last_end = prev_t + prev_dur
        target = start_f + Fraction(n) / fps
        while target + tol < last_end and (end_f is None or target < end_f):
            if prev_arr is None:
                prev_arr = convert(prev_frame)
            yield n, target, prev_arr
            n += 1
            target = start_f + Fraction(n) / fps
    except av.FFmpegError as e:
        raise VideoReadError(f"{path}: decoding failed: {e}") from None
    finally:
        container.close()


class VideoWriter:
    """Write RGB frames to an H.264 MP4 (``yuv420p``, so most players read it) with PyAV.

    ``VideoWriter(path, fps, start_time=0.0, crf=18)`` then ``write(frame uint8 [H, W, 3])`` per frame and
    ``close()`` (or use it as a context manager). Frame ``i`` is presented at ``start_time + i / fps``
    (``start_time`` is a whole number of frames: the synthetic set's videos start at second 900).
    Width and height must be even (4:2:0 chroma) and equal for every frame. ``crf`` is x264's constant
    quality (0 lossless, 18 visually lossless, 23 x264's default); ``preset`` x264's speed/size trade-off.

    The file is a function of the frames: RGB -> YUV is exact integer arithmetic (:func:`rgb_to_yuv420p`)
    and the encoder runs ``threads`` threads (default 1; 0 lets the encoder choose, faster on many cores
    for large frames, but the bytes then rest on x264's own thread determinism).
    """

    def __init__(self, path, fps, start_time=0.0, crf: int = 18, codec: str = "libx264", preset: str = "medium",
                 threads: int = 1):
        av = _av()
        self.path = Path(path)
        self.fps = as_fraction(fps)
        if self.fps <= 0 or self.fps.denominator != 1 and self.fps.denominator > 1001:
            raise ValueError(f"VideoWriter: fps must be a positive rate such as 30 or 29.97, got {fps}")
        start_frames = as_fraction(start_time) * self.fps
        if start_frames.denominator != 1 or start_frames < 0:
            raise ValueError(f"VideoWriter: start_time {start_time} is not a whole number of frames at {fps} fps")
        self._next_pts = int(start_frames)
        self.crf, self.codec, self.preset = int(crf), codec, preset
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"VideoWriter: threads must be an int >= 0 (0: the encoder's choice), got {threads!r}")
        self.threads = threads
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(os.fspath(self.path), "w")
        self._stream = None
        self.frames = 0

    def _open_stream(self, h: int, w: int):
        if h % 2 or w % 2:
            self.close()
            raise ValueError(f"VideoWriter: {self.path}: frame size {w}x{h} must be even (H.264 4:2:0)")
        s = self._container.add_stream(self.codec, rate=self.fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.time_base = Fraction(1) / self.fps if self.fps.denominator == 1 else Fraction(self.fps.denominator,
                                                                                        self.fps.numerator)
        s.codec_context.thread_count = self.threads
        if self.codec == "libx264":
            s.options = {"crf": str(self.crf), "preset": self.preset}
        self._stream = s

    def write(self, frame: np.ndarray) -> None:
        av = _av()
        a = np.asarray(frame)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(f"VideoWriter.write: frame must be uint8 [H, W, 3], got {a.dtype} {a.shape}")
        if self._stream is None:
            self._open_stream(a.shape[0], a.shape[1])
        elif (a.shape[0], a.shape[1]) != (self._stream.height, self._stream.width):
            raise ValueError(f"VideoWriter.write: {self.path}: frame {self.frames} is {a.shape[1]}x{a.shape[0]}, "
                             f"the video is {self._stream.width}x{self._stream.height}")
        # YUV made here, not by swscale (PyAV's implicit or explicit reformat, threaded, SIMD paths chosen
        # by the CPU): through it the same frames gave different files between runs on some machines
        vf = av.VideoFrame.from_ndarray(rgb_to_yuv420p(a), format="yuv420p")
        vf.pts = self._next_pts
        self._next_pts += 1
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            if self._stream is not None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()


# BT.601 limited-range ("studio swing") RGB -> YCbCr, the matrix H.264 decoders assume for untagged SD video,
# as 16-bit fixed point: round(coefficient * 2**16); rows Y, Cb, Cr; columns R, G, B
_YUV601 = np.array([[16829, 33039, 6416], [-9714, -19070, 28784], [28784, -24103, -4681]], dtype=np.int32)


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3]`` RGB (H, W even) -> ``uint8 [H * 3 // 2, W]`` planar YUV 4:2:0 (Y, then U, then V).

    ``Y = 16 + (0.2568 R + 0.5041 G + 0.0979 B)``, ``Cb = 128 + (-0.1482 R - 0.2910 G + 0.4392 B)``,
    ``Cr = 128 + (0.4392 R - 0.3678 G - 0.0714 B)`` (BT.601, limited range); chroma from the mean RGB of
    each 2x2 block. Integer arithmetic, rounded half up, so the result is the same on every machine.
    """
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or a.shape[0] % 2 or a.shape[1] % 2:
        raise ValueError(f"rgb_to_yuv420p: rgb must be uint8 [H, W, 3] with H, W even, got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    # int32 is wide enough (|sums| < 2**27) and, unlike an integer matmul, vectorised by numpy
    r, g, b = (a[..., c].astype(np.int32) for c in range(3))
    s4 = [x.reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3), dtype=np.int32) for x in (r, g, b)]  # 4 x 2x2 mean
    c = _YUV601
    y = (c[0, 0] * r + c[0, 1] * g + c[0, 2] * b + ((16 << 16) + (1 << 15))) >> 16
    u, v = ((c[i, 0] * s4[0] + c[i, 1] * s4[1] + c[i, 2] * s4[2] + ((128 << 18) + (1 << 17))) >> 18 for i in (1, 2))
    planes = [y, u, v]  # PyAV's layout: the three planes flat, one after another
    return np.concatenate([np.clip(p, 0, 255).astype(np.uint8).ravel() for p in planes]).reshape(h * 3 // 2, w)


def write_video(path, frames: Iterable[np.ndarray], fps, start_time=0.0, crf: int = 18) -> int:
    """Write an iterable of ``uint8 [H, W, 3]`` RGB frames as an H.264 MP4; returns the frame count."""
    with VideoWriter(path, fps, start_time=start_time, crf=crf) as w:
        for f in frames:
            w.write(f)
    return w.frames
