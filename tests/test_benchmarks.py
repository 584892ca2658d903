"""Tests of the benchmark scripts themselves (not timings): argument errors, the results file name of a
partial run, and the head benchmark's interleaved CPU workers on a tiny shape."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _samples import benchmark_module

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script, argv, match", [
    ("attn3d", ["--device", "cpu", "--modes", "bwd"], "invalid choice: 'bwd'"),
    ("attn3d", ["--device", "cpu", "--axes", "spacial"], "invalid choice: 'spacial'"),
    ("attn3d", ["--device", "cpu", "--shapes", "nope"], r"--shapes: unknown \['nope'\]"),
    ("attn3d", ["--device", "cpu", "--repeats", "0"], "need --repeats >= 1"),
    ("temporal_proj", ["--device", "cpu", "--shapes", "cpu_roi_t8,nope"], r"--shapes: unknown \['nope'\]"),
    ("temporal_proj", ["--device", "cpu", "--repeats", "0"], "need --repeats >= 1"),
    ("roi_align3d", ["--device", "cpu", "--modes", "fwd,fdw"], r"--modes: unknown \['fdw'\]"),
    ("roi_align3d", ["--device", "cpu", "--boxes", "nope"], r"--boxes: unknown \['nope'\]"),
    ("roi_align3d", ["--device", "cpu", "--warmup", "-1"], "need --repeats >= 1, --warmup >= 0"),
    ("head", ["--device", "cpu", "--repeats", "0"], "need --repeats >= 1"),
    ("head", ["--device", "cpu", "--shapes", "huge"], "invalid choice: 'huge'"),
])
def test_bad_arguments_are_argparse_errors(script, argv, match, capsys):
    """A misspelt mode, axis or shape used to time something else under its name, run nothing and crash
    late, or (repeats 0) be replaced silently."""
    with pytest.raises(SystemExit) as e:
        benchmark_module(script).main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="the reference variant needs torchvision")
def test_head_benchmark_interleaved_workers_and_result_name(tmp_path):
    """The CPU head benchmark: three worker processes timed in interleaved rounds; the memory baseline
    is taken with torchvision already imported; a non-default shape writes head_subset_*.json (the file
    the README cites is the default run's)."""
    env = dict(os.environ, STSSA_BENCH_RESULTS=str(tmp_path), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(BENCH / "head.py"), "--device", "cpu", "--threads", "1", "--shapes",
                        "tiny", "--repeats", "3", "--warmup", "1"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    files = list(tmp_path.glob("head_subset_*.json"))
    assert len(files) == 1 and not list(tmp_path.glob("head_cpu*.json"))
    doc = json.loads(files[0].read_text())
    assert [r["variant"] for r in doc["rows"]] == ["fused", "fused_recompute", "reference"]
    assert all(r["repeats"] == 3 and r["median_ms"] > 0 and r["peak_rss_growth_mb"] >= 0 for r in doc["rows"])
    assert "interleaved" in doc["summary"]["timing"] and "torchvision" in doc["summary"]["memory_measure"]
    assert "temporal_proj" in doc["rows"][0]["dispatch"]
