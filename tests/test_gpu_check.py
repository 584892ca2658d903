"""Rehearsal on CPU of what scripts/gpu_check.sh does on a GPU: the budget logic (stand-in steps and
tests), per-test reporting when a file runs out of time, the packing, and the enumeration and
compilation of the configurations the Triton cache is warmed with."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"_scripts_{name}"] = mod
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load("gpu_check")


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_clock_budgets_cap_and_deadline():
    now = FakeTime()
    c = gpu_check.Clock(deadline=540, reserve=15, min_step=15, now=now)
    assert c.budget(200) == 200
    now.t += 400            # 125 s left before the reserve
    assert c.budget(200) == 125
    now.t += 115            # 10 s left: not worth starting a step
    assert c.budget(200) == 0


def test_parse_outcomes_from_verbose_and_summary_lines():
    text = textwrap.dedent("""\
        tests/test_a.py::test_one PASSED                                   [ 33%]
        tests/test_a.py::test_two[fp16-spatial] FAILED                     [ 66%]
        ==== short test summary info ====
        SKIPPED [1] tests/test_a.py:9: needs two CUDA devices
        ERROR tests/test_a.py::test_three - RuntimeError: boom
        """)
    got = gpu_check.parse_outcomes(text)
    assert got == {"tests/test_a.py::test_one": "PASSED", "tests/test_a.py::test_two[fp16-spatial]": "FAILED",
                   "tests/test_a.py::test_three": "ERROR"}


def test_collection_errors_are_named_with_their_reason():
    text = textwrap.dedent("""\
        tests/test_a.py::test_one
        ==================================== ERRORS ====================================
        ______________________ ERROR collecting tests/test_video.py ______________________
        ImportError while importing test module '/repo/tests/test_video.py'.
        E   ModuleNotFoundError: No module named 'av'
        """)
    assert gpu_check.collect_errors(text) == {"tests/test_video.py": "ModuleNotFoundError: No module named 'av'"}


def test_file_budgets_follow_the_test_counts(monkeypatch, tmp_path):
    """The test budget is shared by test count over the files still to run (the 45-test attention file
    gets most of it, a 3-test file little), never below min_step for each later file."""
    now = FakeTime()
    clock = gpu_check.Clock(deadline=10_000, reserve=15, min_step=15, now=now)
    files = {"tests/test_attention3d.py": ["a"] * 45, "tests/test_models.py": ["m"] * 9,
             "tests/test_triton_launch.py": ["t"] * 3}
    budgets = {}

    def fake_run(cmd, log, budget, env=None, grace=10.0):  # every file uses up its budget
        budgets[os.path.basename(cmd[-1])] = budget
        now.t += budget
        open(log, "w").close()
        return None, budget
    monkeypatch.setattr(gpu_check, "run", fake_run)
    gpu_check.run_test_files(sys.executable, files, clock, total=200, per_file=1000, logs=str(tmp_path), mark="gpu")
    first = 200 * 45 / 57
    assert budgets["test_attention3d.py"] == pytest.approx(first)
    assert budgets["test_models.py"] == pytest.approx(200 - first - 15)  # leaves min_step for the last file
    assert budgets["test_triton_launch.py"] == pytest.approx(15)


def test_file_order_puts_attention_first():
    files = ["tests/test_train.py", "tests/test_models.py", "tests/test_attention3d.py", "tests/test_x.py",
             "tests/test_temporal_proj.py"]
    assert gpu_check.order_files(files) == ["tests/test_attention3d.py", "tests/test_temporal_proj.py",
                                            "tests/test_models.py", "tests/test_train.py", "tests/test_x.py"]


def _stand_ins(tmp_path):
    """Stand-in GPU test files (one quick, one that outlives its budget) and benchmarks."""
    tests = tmp_path / "standin_tests"
    tests.mkdir()
    (tests / "test_attention3d_standin.py").write_text(textwrap.dedent("""\
        import time, pytest
        pytestmark = pytest.mark.gpu
        def test_fast():
            pass
        def test_slow():
            time.sleep(60)
        def test_after_slow():
            pass
        """))
    (tests / "test_video_standin.py").write_text("import not_a_module_on_this_machine\n")  # a missing package
    (tests / "test_models_standin.py").write_text(textwrap.dedent("""\
        import pytest
        @pytest.mark.gpu
        def test_ok():
            pass
        @pytest.mark.gpu
        def test_bad():
            assert 1 == 2
        def test_not_gpu():
            pass
        """))
    benches = tmp_path / "standin_bench"
    benches.mkdir()
    results = tmp_path / "results"
    results.mkdir()
    (benches / "attn3d.py").write_text(  # a benchmark runs as a script: the repository must be on its path
        f"import json, os, sys; assert {ROOT!r} in sys.path, sys.path\n"
        f"json.dump({{'rows': 1}}, open({str(results / 'attn3d_gpu.json')!r}, 'w')); print('bench done')\n")
    (benches / "temporal_proj.py").write_text("import time; time.sleep(60)\n")
    (benches / "head.py").write_text("print('never started')\n")
    return tests, benches, results


def test_whole_run_with_stand_in_steps(tmp_path):
    tests, benches, results = _stand_ins(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), CAP="9.0", STEPS="gputests bench", TEST_PATHS=str(tests),
               T_TESTS="40", T_FILE="8", BENCH_DIR=str(benches), RESULTS_DIR=str(results),
               BENCHES="attn3d temporal_proj head", T_BENCH="attn3d=20 temporal_proj=200 head=20",
               # the test step took 12-24 s here (three pytest starts; 24 s on a loaded machine): 70 - 10 s
               # leaves the quick benchmark its 15 s minimum after up to 45 s of tests
               DEADLINE="70", RESERVE="10", PYTHON=sys.executable, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=150)
    text = p.stdout
    assert p.returncode == 1, text + p.stderr  # a failing stand-in test makes the run fail
    summary = text[text.rindex("=== summary"):]
    # the summary comes last and names every step's outcome
    assert "bench attn3d" in summary and "ok" in summary.split("bench attn3d")[1].splitlines()[0]
    assert "TIMED OUT" in summary.split("bench temporal_proj")[1].splitlines()[0]
    assert "SKIPPED: past DEADLINE" in summary.split("bench head")[1].splitlines()[0]
    # per-test outcomes, also for the file whose budget ran out
    assert "test_slow: NOT RUN" in summary and "test_after_slow: NOT RUN" in summary
    assert "test_bad: FAILED" in summary
    # a file that fails to import is named with the reason, and the other files still run
    assert "tests test_video_standin.py" in summary and "COLLECTION ERROR" in summary and \
        "not_a_module_on_this_machine" in summary
    # logs are written under OUT as they happen (a killed command still returns them), then packed
    assert sorted(os.listdir(out)) == ["gpu_check", "gpu_check.tar.gz"]
    assert (out / "gpu_check" / "summary.txt").exists()
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
        outcomes = json.load(tar.extractfile("gpu_check/gpu_tests.json"))
        assert "gpu_check/results/attn3d_gpu.json" in names and "gpu_check/summary.txt" in names
        assert any(n.endswith("bench_temporal_proj.log") for n in names)
    fast = [n for n in outcomes if n.endswith("test_fast")]
    assert fast and outcomes[fast[0]] == "PASSED"
    assert not any(n.endswith("test_not_gpu") for n in outcomes)  # only the gpu-marked tests


def test_a_failed_build_still_prints_the_summary(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), CAP="9.0", STEPS="build gputests", BUILD_CMD="false",
               DEADLINE="60", PYTHON=sys.executable)
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "build" in p.stdout[p.stdout.rindex("=== summary"):] and "FAILED (rc 1)" in p.stdout
    assert (out / "gpu_check.tar.gz").exists()


triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def warm():
    return _load("warm_triton_cache")


def test_warm_enumeration_covers_every_kernel_once(warm):
    specs, report = warm.configurations(90, ["specs", "bench"])
    assert all(not v.startswith("ERROR") for v in report.values()), report
    names = {s.name for s in specs}
    assert {"attn3d_fwd_packed", "attn3d_bwd_packed", "attn3d_fwd_flash", "attn3d_bwd_delta", "attn3d_bwd_dq",
            "attn3d_bwd_dkdv", "temporal_proj_fwd", "temporal_proj_bwd_dx", "temporal_proj_bwd_dw"} <= names
    assert len({s.key for s in specs}) == len(specs)
    assert any("bench-attn3d" in s.layouts for s in specs)
    # the benchmark tables are read from the scripts themselves
    shapes = warm._module_constant(os.path.join(ROOT, "benchmarks", "attn3d.py"), "GPU_SHAPES")
    assert shapes and all({"B", "T", "H", "W", "dk", "dv"} <= set(s) for s in shapes.values())


def test_warm_compiles_into_the_cache(warm, tmp_path, monkeypatch):
    # one configuration compiled for sm_90 on this CPU lands in the Triton cache the JIT reads
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    specs = warm.spec_configurations(90)
    spec = min((s for s in specs if s.name == "attn3d_bwd_delta"), key=lambda s: len(s.layouts))
    name, config, seconds, status = warm._compile(spec, 90)
    assert status == "ok", status
    cubins = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".cubin")]
    assert cubins
