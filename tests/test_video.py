"""Tests of video decoding and AVA frame preparation (stssa.data.video, python -m stssa.data.frames).

Frames carry their own index as an 8-bit code of black/white vertical bars, which survives H.264 and JPEG
compression, so that each output frame can be traced back to the source frame it shows: the 25 fps -> 30
fps round trip checks count, order and timing; millisecond-rounded variable-rate timestamps, seeking,
resizing, the synthetic set's MP4s, corrupt files and resuming are checked the same way."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av  # a pinned requirement: without it these tests must fail, not skip
import numpy as np
import pytest
from PIL import Image

from stssa.data.ava import count_frames, frame_path
from stssa.data.frames import extract_video, main as frames_main
from stssa.data.video import (VideoReadError, VideoWriter, output_size, probe_video, resampled_frames,
                              rgb_to_yuv420p, write_video)

REPO = Path(__file__).resolve().parents[1]
H, W, BITS = 48, 64, 8


def code_frame(i: int) -> np.ndarray:
    """A frame whose bars spell ``i`` in binary (bar b white when bit b is set)."""
    a = np.zeros((H, W, 3), np.uint8)
    for b in range(BITS):
        if (i >> b) & 1:
            a[:, b * W // BITS:(b + 1) * W // BITS] = 255
    return a


def read_code(a: np.ndarray) -> int:
    a = np.asarray(a, np.float64)
    w = a.shape[1]
    g = a.mean(axis=(0, 2))
    bar = w // BITS
    return sum(int(g[b * bar + bar // 4:(b + 1) * bar - bar // 4].mean() > 127) << b for b in range(BITS))


def write_with_pts(path, times_s, time_base=Fraction(1, 1000), gop=None):
    """An H.264 MP4 of code frames ``0, 1, ...`` presented at ``times_s`` (seconds, rounded to ``time_base``)."""
    c = av.open(str(path), "w")
    s = c.add_stream("libx264", rate=30)
    s.width, s.height, s.pix_fmt, s.time_base = W, H, "yuv420p", time_base
    s.options = {"crf": "18"}
    if gop:
        s.codec_context.gop_size = gop
    for i, t in enumerate(times_s):
        f = av.VideoFrame.from_ndarray(code_frame(i), format="rgb24")
        f.pts = int(round(Fraction(t) / time_base))
        f.time_base = time_base
        for p in s.encode(f):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


@pytest.fixture(scope="module")
def v25(tmp_path_factory):
    """100 code frames at 25 fps (4 s) starting at second 10."""
    p = tmp_path_factory.mktemp("v25") / "clip25.mp4"
    write_video(p, (code_frame(i) for i in range(100)), 25, start_time=10)
    return p


# ------------------------------------------------------------------------------------------- decoding
def test_round_trip_25_to_30_count_order_timing(v25):
    info = probe_video(v25)
    assert (info.width, info.height, info.start, info.fps) == (W, H, 10.0, 25.0)
    out = list(resampled_frames(v25, 30))
    # 4 s at 30 fps; output i shows the source frame on screen at 10 + i/30, i.e. floor(i * 25 / 30).
    assert len(out) == 120
    assert [i for i, _, _ in out] == list(range(120))
    assert [t for _, t, _ in out] == [10 + Fraction(i, 30) for i in range(120)]
    assert [read_code(f) for _, _, f in out] == [i * 25 // 30 for i in range(120)]
    # A segment: start/end in seconds, numbering from the segment's start.
    seg = list(resampled_frames(v25, 30, start=11.5, end=13))
    assert len(seg) == 45 and seg[0][1] == Fraction(23, 2)
    assert [read_code(f) for _, _, f in seg] == [int((Fraction(23, 2) + Fraction(i, 30) - 10) * 25) for i in range(45)]
    # Resuming at an index gives the same frames as decoding from the start.
    tail = list(resampled_frames(v25, 30, start=11.5, end=13, first_index=40))
    assert [(i, read_code(f)) for i, _, f in tail] == [(i, read_code(f)) for i, _, f in seg[40:]]


def test_millisecond_timestamps_and_variable_rate(tmp_path):
    # 29.97 fps with timestamps rounded to 1 ms (as Matroska stores them): a 29.97 -> 30 resampling must
    # neither repeat nor skip frames where the rounding lands a hair late.
    times = [Fraction(i * 1001, 30000) for i in range(60)]
    p = tmp_path / "ntsc.mkv"  # Matroska keeps the millisecond time base (MP4 would rescale it)
    write_with_pts(p, times)
    codes = [read_code(f) for _, _, f in resampled_frames(p, Fraction(30000, 1001), start=0)]
    assert codes == list(range(60))
    # Variable rate: frames held for different times; output i shows the last frame that started by i/30.
    vfr = [0, Fraction(1, 10), Fraction(1, 2), Fraction(6, 10), Fraction(13, 10), 2]
    p = tmp_path / "vfr.mp4"
    write_with_pts(p, vfr)
    got = [read_code(f) for _, _, f in resampled_frames(p, 30, start=0, end=2)]
    want = [max(k for k, t in enumerate(vfr) if t <= Fraction(i, 30)) for i in range(60)]
    assert got == want


def test_a_long_hole_in_the_timestamps_is_an_error(tmp_path):
    # What FFmpeg gives for a stretch of undecodable data: frames stop, and resume seconds later.
    p = tmp_path / "hole.mkv"
    write_with_pts(p, [Fraction(i, 10) for i in range(10)] + [4 + Fraction(i, 10) for i in range(10)])
    with pytest.raises(VideoReadError, match=r"hole.mkv: no decodable frame between 0.900 s and 4.000 s"):
        list(resampled_frames(p, 30))
    # The last frame (4.9 s) lasts one frame of the stream's 30 fps: output frames at i/30 < 4.9 + 1/30.
    assert len(list(resampled_frames(p, 30, max_gap=None))) == 148
    assert len(list(resampled_frames(p, 30, start=4))) == 28  # the hole is outside the range asked for


def test_seek_gives_the_frames_of_a_full_decode(tmp_path):
    p = tmp_path / "long.mp4"
    write_with_pts(p, [Fraction(i, 25) for i in range(250)], time_base=Fraction(1, 25), gop=12)
    a = [(i, t, read_code(f)) for i, t, f in resampled_frames(p, 30, start=7, end=8)]
    b = [(i, t, read_code(f)) for i, t, f in resampled_frames(p, 30, start=7, end=8, seek=False)]
    assert a == b and len(a) == 30 and a[0][2] == 175


def test_resize_keeps_aspect_and_matches_the_dataset_rounding(v25):
    from stssa.data.transforms import short_side_size
    for h, w, s in [(48, 64, 24), (64, 48, 24), (360, 640, 256), (1080, 1920, 320), (101, 77, 40), (50, 50, 7)]:
        assert output_size(h, w, s) == short_side_size(h, w, s)
    _, _, f = next(resampled_frames(v25, 30, short_side=24))
    assert f.shape == (24, 32, 3)
    big = [read_code(f) for _, _, f in resampled_frames(v25, 30, short_side=96)]
    assert big == [i * 25 // 30 for i in range(120)]


def test_read_errors_name_the_file(tmp_path, v25):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 200)
    with pytest.raises(VideoReadError, match="bad.mp4"):
        probe_video(bad)
    with pytest.raises(VideoReadError, match="bad.mp4"):
        list(resampled_frames(bad, 30))
    with pytest.raises(VideoReadError, match="clip25.mp4.*first frame is at 10.000 s"):
        next(resampled_frames(v25, 30, start=0))
    with pytest.raises(ValueError, match="fps"):
        next(resampled_frames(v25, 0))


def test_writer_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", [np.zeros((15, 16, 3), np.uint8)], 30)
    w = VideoWriter(tmp_path / "x.mp4", 30)
    with pytest.raises(ValueError, match="uint8"):
        w.write(np.zeros((16, 16, 3), np.float32))
    w.write(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="16x16"):
        w.write(np.zeros((18, 16, 3), np.uint8))
    w.close()
    with pytest.raises(ValueError, match="whole number of frames"):
        VideoWriter(tmp_path / "y.mp4", 30, start_time=0.01)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads"):
            VideoWriter(tmp_path / "z.mp4", 30, threads=bad)
    assert not (tmp_path / "z.mp4").exists()


@pytest.mark.parametrize("h, w", [(2, 2), (48, 64), (50, 66), (6, 98)])
def test_rgb_to_yuv420p_is_bt601_limited_range(h, w):
    """Against the BT.601 studio-swing formulas in float64: the 16-bit fixed-point coefficients are within
    2**-17 of the exact ones (<= 0.006 over 3 x 255), so every sample is the reference rounded, give or take
    that much at a half."""
    rng = np.random.default_rng([h, w])
    rgb = rng.integers(0, 256, (h, 2 * w, 3), dtype=np.uint8)[:, ::2]  # non-contiguous
    out = rgb_to_yuv420p(rgb)
    assert out.shape == (h * 3 // 2, w) and out.dtype == np.uint8
    x = rgb.astype(np.float64) / 255
    kr, kb = 0.299, 0.114
    luma = kr * x[..., 0] + (1 - kr - kb) * x[..., 1] + kb * x[..., 2]
    m = x.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    ml = kr * m[..., 0] + (1 - kr - kb) * m[..., 1] + kb * m[..., 2]
    ref = [16 + 219 * luma, 128 + 224 * (m[..., 2] - ml) / (2 * (1 - kb)), 128 + 224 * (m[..., 0] - ml) / (2 * (1 - kr))]
    flat = out.reshape(-1).astype(np.float64)
    got = np.split(flat, [h * w, h * w + h * w // 4])
    for g, r in zip(got, ref):
        assert np.abs(g - r.reshape(-1)).max() <= 0.5 + 0.006
    # what swscale makes of smooth content (its chroma filter differs on noise): within one code value
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (h + w - 2)], -1).astype(np.uint8)
    sws = av.VideoFrame.from_ndarray(smooth, format="rgb24").reformat(format="yuv420p", threads=1).to_ndarray()
    assert np.abs(rgb_to_yuv420p(smooth).astype(int) - sws)[:h].max() <= 1
    for bad in (np.zeros((3, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8)):
        with pytest.raises(ValueError, match="rgb_to_yuv420p"):
            rgb_to_yuv420p(bad)


# ----------------------------------------------------------------------------------------- frames CLI
def _codes(root: Path, vid: str) -> list[int]:
    n = count_frames(root, vid)
    return [read_code(np.asarray(Image.open(frame_path(root, vid, i)))) for i in range(n)]


def test_frames_cli_layout_numbering_and_errors(tmp_path, v25, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    os.link(v25, videos / "good.mp4")
    (videos / "garbage.mkv").write_bytes(b"\x1aE\xdf\xa3 not matroska" * 50)
    write_with_pts(tmp_path / "whole.mkv", [10 + Fraction(i, 25) for i in range(300)], gop=25)  # 10 .. 22 s
    data = (tmp_path / "whole.mkv").read_bytes()
    (videos / "truncated.mkv").write_bytes(data[: len(data) // 2])  # a broken download
    (videos / "holed.mkv").write_bytes(data[: len(data) // 3] + b"\xff" * (len(data) // 3)
                                       + data[2 * len(data) // 3:])  # seconds of undecodable data
    (videos / "notes.txt").write_text("not a video")  # other files are ignored
    out = tmp_path / "frames"
    rc = frames_main(["--videos", str(videos), "--out", str(out), "--start", "11", "--end", "none", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [s for s in err.splitlines() if s.startswith("error:")]
    assert len(lines) == 3, err
    assert "garbage.mkv: cannot open" in lines[0]
    assert "holed.mkv: " in lines[1] and ("decoding failed" in lines[1] or "no decodable frame" in lines[1])
    assert "truncated.mkv: decoding stopped" in lines[2]
    assert not (out / "holed" / ".frames.json").exists() or \
        not json.loads((out / "holed" / ".frames.json").read_text())["complete"]
    # --end 13: the good video's numbering.
    assert count_frames(out, "good") == 90  # 11 .. 14 s
    out = tmp_path / "frames13"
    rc = frames_main(["--videos", str(videos / "good.mp4"), "--out", str(out), "--start", "11", "--end", "13",
                      "--quiet"])
    assert rc == 0
    # The good video is complete: files 000001.. from second 11, source frame floor((11 + (n-1)/30 - 10) * 25).
    assert _codes(out, "good") == [int((11 + Fraction(i, 30) - 10) * 25) for i in range(60)]
    assert (out / "good" / "good_000001.jpg").exists() and not (out / "good" / "good_000061.jpg").exists()
    assert json.loads((out / "good" / ".frames.json").read_text())["complete"] is True
    assert not (out / "garbage").exists() or count_frames(out, "garbage") == 0
    # Bad arguments: exit 2.
    with pytest.raises(SystemExit) as e:
        frames_main(["--videos", str(videos), "--out", str(out), "--fps", "0"])
    assert e.value.code == 2


def test_frames_resume_skip_and_parameter_change(tmp_path, v25):
    out = tmp_path / "frames"
    ref = tmp_path / "ref"
    full = extract_video(v25, ref, fps=30, start=10, end=None)
    assert full == {"video_id": "clip25", "status": "done", "frames": 120, "written": 120}

    class Killed(Exception):
        pass

    seen = []

    def kill_after_50(n):
        seen.append(n)
        if sum(seen) >= 50:
            raise Killed  # as a kill mid-video: whole frames on disk, marker incomplete

    with pytest.raises(Killed):
        extract_video(v25, out, fps=30, start=10, end=None, progress=kill_after_50)
    assert count_frames(out, "clip25") == 50
    first = {i: os.stat(frame_path(out, "clip25", i)).st_mtime_ns for i in range(50)}
    again = extract_video(v25, out, fps=30, start=10, end=None)
    assert again["status"] == "done" and again["written"] == 70 and again["frames"] == 120
    assert all(os.stat(frame_path(out, "clip25", i)).st_mtime_ns == m for i, m in first.items())
    for i in range(120):  # same bytes as an uninterrupted run
        assert Path(frame_path(out, "clip25", i)).read_bytes() == Path(frame_path(ref, "clip25", i)).read_bytes()
    assert extract_video(v25, out, fps=30, start=10, end=None)["status"] == "skipped"
    # Other parameters: refused, or redone with overwrite.
    with pytest.raises(FileExistsError, match="other parameters"):
        extract_video(v25, out, fps=30, start=10, end=None, short_side=24)
    redo = extract_video(v25, out, fps=30, start=10, end=None, short_side=24, overwrite=True)
    assert redo["written"] == 120 and Image.open(frame_path(out, "clip25", 0)).size == (32, 24)
    # Frames made by another tool, full count, no marker: skipped; a partial such folder: refused.
    other = tmp_path / "other"
    (other / "clip25").mkdir(parents=True)
    for i in range(120):
        Image.fromarray(code_frame(0)).save(frame_path(other, "clip25", i))
    assert extract_video(v25, other, fps=30, start=10, end=None)["status"] == "skipped"
    os.unlink(frame_path(other, "clip25", 119))
    with pytest.raises(FileExistsError, match="119 frames"):
        extract_video(v25, other, fps=30, start=10, end=None)


def test_synthetic_mp4s_give_the_frame_folders_back(tmp_path):
    from stssa.data.synthetic import make_dataset
    paths = make_dataset(tmp_path / "syn", videos=2, seconds=2, seed=1, height=48, width=64, videos_format="mp4")
    vids = sorted(Path(paths["videos"]).glob("*.mp4"))
    assert len(vids) == 2
    info = probe_video(vids[0])
    assert info.start == 900.0 and info.fps == 30.0 and (info.width, info.height) == (64, 48)
    out = tmp_path / "frames"
    # The AVA defaults (--start 900 --end 1800) and two worker processes.
    rc = subprocess.run([sys.executable, "-m", "stssa.data.frames", "--videos", paths["videos"], "--out", str(out),
                         "--workers", "2", "--quiet"], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert rc.returncode == 0, rc.stderr
    for v in vids:
        n = count_frames(paths["frames"], v.stem)
        assert count_frames(out, v.stem) == n == json.loads(Path(paths["info"]).read_text())["frames_per_video"]
        # Each extracted frame is closer to the rendered frame of the same index than to its neighbours.
        for i in (0, 45, 60, 61, n - 1):
            a = np.asarray(Image.open(frame_path(out, v.stem, i)), np.float64)
            d = {j: np.abs(a - np.asarray(Image.open(frame_path(paths["frames"], v.stem, j)), np.float64)).mean()
                 for j in range(max(0, i - 1), min(n, i + 2))}
            assert min(d, key=d.get) == i and d[i] < 8, d
    with pytest.raises(ValueError, match="even"):
        make_dataset(tmp_path / "odd", videos=2, seconds=1, height=47, width=64, videos_format="mp4")
    from stssa.data.synthetic import main as synthetic_main
    assert synthetic_main(["--out", str(tmp_path / "cli"), "--videos", "2", "--seconds", "1", "--height", "32",
                           "--width", "48", "--videos-format", "mp4", "--quiet"]) == 0
    assert len(list((tmp_path / "cli" / "videos").glob("*.mp4"))) == 2


def test_audio_longer_than_the_video_is_not_truncation(tmp_path):
    """Matroska has no per-stream duration field: the video's own comes from its DURATION tag, not from
    the file's duration, which covers the longest stream (here 8 s of audio after 4 s of video)."""
    path = tmp_path / "av.mkv"
    c = av.open(str(path), "w")
    vs = c.add_stream("libx264", rate=25)
    vs.width, vs.height, vs.pix_fmt, vs.time_base = W, H, "yuv420p", Fraction(1, 25)
    au = c.add_stream("aac", rate=48000)
    for i in range(100):
        f = av.VideoFrame.from_ndarray(code_frame(i), format="rgb24")
        f.pts = i
        for p in vs.encode(f):
            c.mux(p)
    for p in vs.encode():
        c.mux(p)
    n, fs = 0, au.codec_context.frame_size or 1024
    while n < 8 * 48000:
        a = av.AudioFrame.from_ndarray(np.zeros((1, fs), np.float32), format="fltp", layout="mono")
        a.sample_rate, a.pts = 48000, n
        for p in au.encode(a):
            c.mux(p)
        n += fs
    for p in au.encode():
        c.mux(p)
    c.close()
    info = probe_video(path)
    assert info.duration == pytest.approx(4.0) and info.duration_of_stream
    res = extract_video(path, tmp_path / "out", fps=30, start=0, end=None)
    assert res["status"] == "done" and res["frames"] == 120
    assert _codes(tmp_path / "out", "av")[-1] == 99


@pytest.mark.parametrize("args, match", [(["--end", "abc"], "argument --end: a number of seconds or 'none'"),
                                         (["--end", "2", "--max-gap", "-1"], "--max-gap >= 0")])
def test_frames_cli_argument_errors(tmp_path, v25, capsys, args, match):
    with pytest.raises(SystemExit) as e:
        frames_main(["--videos", str(v25), "--out", str(tmp_path / "o"), "--start", "0", *args])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_matroska_duration_tag_of_a_stream_that_starts_late(tmp_path):
    """ffmpeg's Matroska DURATION tag is the track's end time: a video from 900 s to 902 s says 00:15:02,
    which is a 2 s duration (read as 902 s, the intact file was refused as truncated)."""
    path = tmp_path / "late.mkv"
    write_with_pts(path, [900 + Fraction(i, 30) for i in range(60)])
    info = probe_video(path)
    assert info.start == pytest.approx(900.0) and info.duration == pytest.approx(2.0, abs=0.05)
    res = extract_video(path, tmp_path / "out", fps=30, start=900, end=None)
    assert res["status"] == "done" and res["frames"] == 60


def test_writer_output_is_a_function_of_the_frames(tmp_path):
    """The same frames give the same file (so the synthetic MP4s, and models trained on frames extracted
    from them, are reproducible). With PyAV's swscale conversion in the path they were not: here through the
    implicit one (decoded pixels up to 50 apart between runs), on the CI machine through the explicit one."""
    from stssa.data.synthetic import render_video, simulate_video
    rng = np.random.default_rng([3, 1])
    frames = [f.copy() for f in render_video(simulate_video(rng, 3, 48, 64), rng, 48, 64)]
    for k in range(4):
        write_video(tmp_path / f"v{k}.mp4", frames, 30, start_time=900)
    data = [(tmp_path / f"v{k}.mp4").read_bytes() for k in range(4)]
    for k, d in enumerate(data[1:], 1):
        if d != data[0]:  # say where: the x264 header (its settings), or which frames' pixels
            off = next((i for i, (a, b) in enumerate(zip(d, data[0])) if a != b), min(len(d), len(data[0])))
            dec = [[f.to_ndarray(format="rgb24").astype(int) for f in av.open(str(tmp_path / f"v{j}.mp4")).decode(video=0)]
                   for j in (0, k)]
            diffs = [int(np.abs(a - b).max()) for a, b in zip(*dec)]
            pytest.fail(f"encode {k} differs from encode 0: {len(d)} vs {len(data[0])} bytes, first at byte {off}; "
                        f"frames differing: {sum(x > 0 for x in diffs)}/{len(diffs)}, max pixel diff {max(diffs)}")


def test_frames_follow_the_umask_of_the_moment(tmp_path, v25, monkeypatch):
    """JPEGs get 0666 minus the umask when they are written (not when stssa was imported), read without
    setting the umask (os.umask has no read-only form; another thread's file would get the wrong mode)."""
    import stssa._os
    old = os.umask(0o027)
    try:
        if sys.platform.startswith("linux"):
            assert stssa._os.current_umask() == 0o027
            monkeypatch.setattr(stssa._os.os, "umask", lambda m: pytest.fail("os.umask called"))
        res = extract_video(v25, tmp_path / "out", fps=30, start=10, end=11)
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert res["status"] == "done"
    jpgs = sorted((tmp_path / "out").rglob("*.jpg"))
    assert jpgs and all(p.stat().st_mode & 0o777 == 0o640 for p in jpgs)
