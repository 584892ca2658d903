#!/usr/bin/env python3
"""The whole GPU-side check in one call that fits one device lease (driven by ``scripts/gpu_check.sh``).

Steps, each under a time budget, none started past the overall DEADLINE (seconds from the start):

1. environment (GPU, driver, torch, triton, commit);
2. build the extension for this GPU's arch **while** a process pool warms Triton's cache with every
   kernel configuration compile_check knows (``scripts/warm_triton_cache.py --sources specs``: needs no
   extension); then the benchmarks' and the STSSA head's configurations (``--sources bench,head``);
3. the GPU tests (``-m gpu``), file by file, each file with a budget (its share of what is left of
   the test budget, so a file that finishes early leaves more for the rest); every test is reported
   as passed / failed / skipped / error, and those a file's budget cut off as "not run";
4. the benchmarks in priority order (attn3d first), each with its own cap;
5. everything (logs, result JSON, warm-up and test reports, summary) packed into one archive
   ``$OUT/gpu_check.tar.gz``; the summary is printed last, also when a step fails.

Environment knobs (defaults in brackets): OUT [benchmarks/results/gpu_check], DEADLINE [540], RESERVE [30],
STEPS ["build warm gputests bench"], BENCHES ["attn3d temporal_proj head roi_align3d"], T_BUILD [200],
T_WARM [200], T_TESTS [200], T_FILE [120], T_BENCH ["attn3d=100 temporal_proj=60 head=60 roi_align3d=40"],
PYTHON [this interpreter], and for rehearsals with stand-in steps (tests/test_gpu_check.py): CAP (skip
the GPU query, e.g. 9.0), BUILD_CMD, WARM_CMD, TEST_PATHS [tests], TEST_MARK [gpu], BENCH_DIR
[benchmarks], RESULTS_DIR [benchmarks/results].
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIORITY = ["attention3d", "temporal_proj", "roi_align3d", "models", "train"]  # test files, most important first


class Clock:
    """Seconds since the start and what a step may still spend before the deadline."""

    def __init__(self, deadline: float, reserve: float = 15.0, min_step: float = 15.0, now=time.monotonic):
        self.now, self.t0 = now, now()
        self.deadline, self.reserve, self.min_step = deadline, reserve, min_step

    def elapsed(self) -> float:
        return self.now() - self.t0

    def left(self) -> float:
        return self.deadline - self.reserve - self.elapsed()

    def budget(self, cap: float) -> float:
        """min(cap, time left before the deadline); 0 when less than ``min_step`` is left (skip the step)."""
        left = self.left()
        return 0.0 if left < self.min_step else min(cap, left)


@dataclasses.dataclass
class Result:
    name: str
    status: str   # "ok" | "FAILED (rc N)" | "TIMED OUT" | "SKIPPED: ..."
    seconds: float = 0.0
    detail: str = ""


def run(cmd: list[str], log: str, budget: float, env: dict | None = None, grace: float = 10.0) -> tuple[int | None, float]:
    """Run ``cmd`` with output to ``log`` for at most ``budget`` s. On time-out the process group gets
    SIGINT (pytest then still reports what ran) and SIGKILL ``grace`` s later. Returns (rc or None on
    time-out, seconds)."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            rc = None
            for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
    return rc, time.monotonic() - t0


# ---- GPU tests, per file ---------------------------------------------------------------------------

_OUTCOME_RE = re.compile(r"^(\S*::\S+?)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_OUTCOME_RE_RA = re.compile(r"^(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\s+(\S*::\S+)")


# node ids relative to the repository, and its markers, wherever the test files are
_PYTEST_ROOT = ["-p", "no:cacheprovider", "--rootdir", ROOT, "-c", os.path.join(ROOT, "pytest.ini")]


_COLLECT_ERROR_RE = re.compile(r"^ERROR collecting (\S+)")
_COLLECT_REASON_RE = re.compile(r"^E\s+(\w+(?:Error|Exception)\b.*)$")


def collect_errors(text: str) -> dict[str, str]:
    """{test file: first error line} of the files pytest could not import (``ERROR collecting``)."""
    errors, current = {}, None
    for line in text.splitlines():
        m = _COLLECT_ERROR_RE.search(line.strip("_ "))
        if m:
            current = m.group(1)
            errors[current] = "import failed"
            continue
        m = _COLLECT_REASON_RE.match(line)
        if current and m and errors[current] == "import failed":
            errors[current] = m.group(1)[:160]
    return errors


def collect(py: str, paths: list[str], mark: str, log: str, timeout: float = 120.0
            ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({test file: [node ids]} of the tests carrying ``mark``, {file: error} of the files that failed to
    import) by pytest --collect-only; a file that fails to import (a package this machine lacks) does
    not hide the others' tests."""
    out = subprocess.run([py, "-m", "pytest", *_PYTEST_ROOT, "-q", "--collect-only", "--continue-on-collection-errors",
                          "-m", mark, *paths], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    with open(log, "a") as f:
        f.write(out.stdout + out.stderr)
    errors = collect_errors(out.stdout + out.stderr)
    if out.returncode not in (0, 1, 5) and not errors:  # pytest itself could not run (e.g. not installed)
        errors["pytest"] = (out.stderr.strip().splitlines() or [f"rc {out.returncode}"])[-1][:160]
    files: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        if "::" in line and not line.startswith(" "):
            part = line.split("::")[0]
            # ids are relative to the repository, or to the given path for files outside it
            cands = [os.path.join(ROOT, part)] + [os.path.join(p if os.path.isdir(p) else os.path.dirname(p), part)
                                                  for p in paths]
            path = next((c for c in cands if os.path.exists(c)), part)
            files.setdefault(os.path.relpath(path, ROOT), []).append(line.strip())
    return files, errors


def _short(nodeid: str) -> str:
    """The test part of a node id (a run of one file prints the file part differently for files
    outside the repository)."""
    return nodeid.partition("::")[2]


def order_files(files) -> list[str]:
    def rank(f):
        base = os.path.basename(f)
        return next((i for i, key in enumerate(PRIORITY) if key in base), len(PRIORITY)), base
    return sorted(files, key=rank)


def parse_outcomes(text: str) -> dict[str, str]:
    """{node id: outcome} from pytest ``-v -rA`` output (the per-test lines and the short summary)."""
    got = {}
    for line in text.splitlines():
        m = _OUTCOME_RE.match(line.strip())
        if m:
            got[m.group(1)] = m.group(2)
            continue
        m = _OUTCOME_RE_RA.match(line.strip())
        if m:
            got.setdefault(m.group(2), m.group(1))
    return got


def run_test_files(py: str, files: dict[str, list[str]], clock: Clock, total: float, per_file: float,
                   logs: str, mark: str) -> tuple[list[Result], dict[str, str]]:
    """Each file in priority order with budget = min(per_file, what is left of ``total`` shared over
    the files still to run). Returns (one Result per file, {node id: outcome or "NOT RUN (...)"})."""
    results, outcomes = [], {}
    start = clock.elapsed()
    ordered = order_files(files)
    for i, f in enumerate(ordered):
        # what is left of the test budget, shared by test count over the files still to run (a file of
        # 45 tests gets more than one of 3), then at least min_step for every later file
        left = total - (clock.elapsed() - start)
        later = ordered[i + 1:]
        n_here, n_rest = len(files[f]), sum(len(files[g]) for g in later)
        share = min(left * n_here / max(n_here + n_rest, 1), left - clock.min_step * len(later))
        budget = clock.budget(min(per_file, max(share, clock.min_step)))
        name = "tests " + os.path.basename(f)
        if budget <= 0:
            results.append(Result(name, "SKIPPED: past DEADLINE or test budget"))
            outcomes.update({n: "NOT RUN (no time left)" for n in files[f]})
            continue
        log = os.path.join(logs, f"test_{os.path.basename(f)}.log")
        rc, secs = run([py, "-m", "pytest", *_PYTEST_ROOT, "-v", "-rA", "-m", mark, f], log, budget)
        got = {_short(k): v for k, v in parse_outcomes(open(log, errors="replace").read()).items()}
        for n in files[f]:
            outcomes[n] = got.get(_short(n), f"NOT RUN (file budget {budget:.0f} s used up)" if rc is None else "NOT REPORTED")
        counts = {}
        for n in files[f]:
            key = outcomes[n].split(" ")[0]
            counts[key] = counts.get(key, 0) + 1
        detail = ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items()))
        status = "TIMED OUT" if rc is None else ("ok" if rc in (0, 5) else f"FAILED (rc {rc})")
        results.append(Result(name, status, secs, detail))
    return results, outcomes


# ---- the run ---------------------------------------------------------------------------------------


def _caps(spec: str) -> dict[str, float]:
    return {k: float(v) for k, v in (item.split("=") for item in spec.split())}


def pack(out_dir: str, logs: str, summary_lines: list[str], since: float, results_dir: str) -> str:
    """Copy the result files written to ``results_dir`` since ``since`` into ``logs`` and tar it all as
    the one file of ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    for path in glob.glob(os.path.join(results_dir, "*")):
        if os.path.isfile(path) and os.path.getmtime(path) >= since and os.path.abspath(path) != os.path.abspath(out_dir):
            dst = os.path.join(logs, "results", os.path.basename(path))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(path, "rb") as a, open(dst, "wb") as b:
                b.write(a.read())
    with open(os.path.join(logs, "summary.txt"), "w") as f:
        f.write("\n".join(summary_lines) + "\n")
    archive = os.path.join(out_dir, "gpu_check.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(logs, arcname="gpu_check")
    return archive


def main() -> int:
    env = os.environ
    py = env.get("PYTHON", sys.executable)
    out_dir = os.path.abspath(env.get("OUT", os.path.join(ROOT, "benchmarks", "results", "gpu_check")))
    steps = env.get("STEPS", "build warm gputests bench").split()
    clock = Clock(float(env.get("DEADLINE", 540)), reserve=float(env.get("RESERVE", 30)))
    # the benchmarks run as scripts (sys.path[0] = benchmarks/) and the build is in place, not installed
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    env = os.environ
    since = time.time() - 1
    bench_dir = os.path.abspath(env.get("BENCH_DIR", os.path.join(ROOT, "benchmarks")))
    results_dir = os.path.abspath(env.get("RESULTS_DIR", os.path.join(ROOT, "benchmarks", "results")))
    # logs are written under OUT as they happen (a command killed before the end still returns them),
    # and packed into OUT/gpu_check.tar.gz at the end
    logs = os.path.join(out_dir, "gpu_check")
    shutil.rmtree(logs, ignore_errors=True)
    os.makedirs(logs)
    results: list[Result] = []
    outcomes: dict[str, str] = {}
    rc_all = 0

    def header(name):
        print(f"\n=== {name} (t={clock.elapsed():.0f}s) ===", flush=True)

    def tail(log, n=15):
        try:
            print("".join(open(log, errors="replace").readlines()[-n:]), end="", flush=True)
        except OSError:
            pass

    try:
        header("environment")
        cap = env.get("CAP")
        probe = ("import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', "
                 "triton.__version__); p = torch.cuda.get_device_capability(); print(torch.cuda.get_device_name(), "
                 "f'sm_{p[0]}{p[1]}'); print(f'CAP={p[0]}.{p[1]}')")
        if cap is None:
            out = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
            print(out.stdout + out.stderr, end="")
            m = re.search(r"CAP=(\d+\.\d+)", out.stdout)
            if not m:
                results.append(Result("environment", "FAILED: no CUDA device"))
                return 1
            cap = m.group(1)
        for tool in (["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     ["git", "log", "-1", "--format=commit %H %s"]):
            if shutil.which(tool[0]):
                subprocess.run(tool, cwd=ROOT, check=False, stderr=subprocess.DEVNULL)
        cc = int(cap.replace(".", ""))
        ncpu = os.cpu_count() or 2
        missing = [m for m in ("pytest", "hypothesis", "yaml", "numpy", "torchvision", "av", "matplotlib")
                   if subprocess.run([py, "-c", f"import {m}"], capture_output=True, timeout=60).returncode]
        results.append(Result("environment", "ok", clock.elapsed(), f"sm_{cc}, {ncpu} CPUs"
                              + (f"; missing Python packages: {', '.join(missing)}" if missing else "")))
        if missing:
            print(f"missing Python packages (tests importing them are reported as collection errors): {missing}")

        build_proc = None
        build_cmd = shlex.split(env.get("BUILD_CMD", f"{py} setup.py -q build_ext --inplace"))
        nvcc = "BUILD_CMD" in env or shutil.which("nvcc") or os.path.exists(
            os.path.join(env.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
        if "build" in steps:
            header(f"build (sm_{cc}) in the background" + ("" if nvcc else ": no nvcc, CPU-only extension"))
            # without nvcc the CUDA RoIAlign cannot be built; the Triton ops need only the CPU extension
            benv = dict(env, STSSA_CUDA_ARCHS=cap, MAX_JOBS=str(max(2, ncpu // 2)),
                        **({"FORCE_CUDA": "1"} if nvcc else {"STSSA_NO_CUDA": "1"}))
            build_log = os.path.join(logs, "build.log")
            t_build = clock.budget(float(env.get("T_BUILD", 200)))
            build_t0 = time.monotonic()
            build_proc = subprocess.Popen(build_cmd, stdout=open(build_log, "wb"), stderr=subprocess.STDOUT,
                                          cwd=ROOT, env=benv, start_new_session=True)
        warm_cmd = shlex.split(env.get("WARM_CMD", f"{py} {os.path.join(ROOT, 'scripts', 'warm_triton_cache.py')}"))
        if "warm" in steps:
            header("warm the Triton cache: compile_check's configurations (while the build runs)")
            jobs = max(1, ncpu - (ncpu // 2 if build_proc else 0))
            log = os.path.join(logs, "warm.log")
            rc, secs = run(warm_cmd + ["--cc", str(cc), "--jobs", str(jobs), "--sources", "specs",
                                       "--json", os.path.join(logs, "warm_specs.json")], log,
                           clock.budget(float(env.get("T_WARM", 200))))
            tail(log, 4)
            results.append(Result("warm specs", "ok" if rc == 0 else ("TIMED OUT" if rc is None else f"FAILED (rc {rc})"), secs))
        if build_proc is not None:
            try:
                brc = build_proc.wait(timeout=max(1.0, t_build - (time.monotonic() - build_t0)))
            except subprocess.TimeoutExpired:
                os.killpg(build_proc.pid, signal.SIGKILL)
                brc = None
            secs = time.monotonic() - build_t0
            if brc != 0 and nvcc and "BUILD_CMD" not in env:
                # the CUDA build failed: a CPU-only extension still lets the Triton tests and benchmarks run
                tail(build_log, 40)
                results.append(Result("build", ("TIMED OUT" if brc is None else f"FAILED (rc {brc})")
                                      + ": CUDA RoIAlign not checked; retrying CPU-only", secs))
                rc_all = 1
                header("build, CPU-only extension (STSSA_NO_CUDA=1)")
                brc, secs = run(build_cmd, build_log, clock.budget(120.0),
                                env=dict(env, STSSA_NO_CUDA="1", MAX_JOBS=str(ncpu)))
                results.append(Result("build CPU-only", "ok" if brc == 0 else f"FAILED (rc {brc})", secs))
                if brc != 0:
                    tail(build_log, 40)
                    return 1
            elif brc != 0:
                tail(build_log, 40)
                results.append(Result("build", "TIMED OUT" if brc is None else f"FAILED (rc {brc})", secs))
                rc_all = 1
                return 1
            else:
                results.append(Result("build", "ok" if nvcc else "ok (CPU-only: no nvcc; CUDA RoIAlign not checked)",
                                      secs))
                rc_all |= not nvcc
            subprocess.run([py, "-c", "import stssa_kernels; print('build info:', stssa_kernels.BUILD_INFO)"], cwd=ROOT,
                           timeout=120)
        if "warm" in steps:
            header("warm the Triton cache: benchmark and STSSA-head configurations")
            log = os.path.join(logs, "warm.log")
            rc, secs = run(warm_cmd + ["--cc", str(cc), "--jobs", str(ncpu), "--sources", "specs,bench,head",
                                       "--json", os.path.join(logs, "warm_all.json")], log,
                           clock.budget(float(env.get("T_WARM", 200))))
            tail(log, 4)
            results.append(Result("warm bench+head", "ok" if rc == 0 else ("TIMED OUT" if rc is None else f"FAILED (rc {rc})"), secs))

        if "gputests" in steps:
            header("GPU tests")
            mark = env.get("TEST_MARK", "gpu")
            files, errors = collect(py, env.get("TEST_PATHS", "tests").split(), mark, os.path.join(logs, "collect.log"))
            for f, why in errors.items():
                results.append(Result(f"tests {os.path.basename(f)}", f"COLLECTION ERROR (its {mark} tests, if any, "
                                      f"not run): {why}"))
                rc_all = 1
            res, outcomes = run_test_files(py, files, clock, float(env.get("T_TESTS", 200)),
                                           float(env.get("T_FILE", 120)), logs, mark)
            for r in res:
                print(f"{r.name}: {r.status} {r.detail} ({r.seconds:.0f} s)")
            results += res
            with open(os.path.join(logs, "gpu_tests.json"), "w") as f:
                json.dump(outcomes, f, indent=1)
            if any(not o.startswith(("PASSED", "SKIPPED", "XFAIL")) for o in outcomes.values()):
                rc_all = 1

        if "bench" in steps:
            caps = _caps(env.get("T_BENCH", "attn3d=100 temporal_proj=60 head=60 roi_align3d=40"))
            for b in env.get("BENCHES", "attn3d temporal_proj head roi_align3d").split():
                script = os.path.join(bench_dir, f"{b}.py")
                if not os.path.exists(script):
                    results.append(Result(f"bench {b}", "SKIPPED: no such benchmark"))
                    continue
                budget = clock.budget(caps.get(b, 60.0))
                if budget <= 0:
                    results.append(Result(f"bench {b}", f"SKIPPED: past DEADLINE (run STEPS=bench BENCHES={b})"))
                    continue
                header(f"benchmark {b}")
                log = os.path.join(logs, f"bench_{b}.log")
                rc, secs = run([py, script], log, budget)
                tail(log, 30)
                status = "ok" if rc == 0 else ("TIMED OUT (raise T_BENCH or run alone)" if rc is None else f"FAILED (rc {rc})")
                results.append(Result(f"bench {b}", status, secs))
                rc_all |= rc != 0
        return rc_all
    except Exception as e:  # report it in the summary; the archive is still written
        import traceback
        traceback.print_exc()
        results.append(Result("gpu_check.py", f"CRASHED: {type(e).__name__}: {e}"))
        return 1
    finally:
        lines = [f"{r.name:34s} {r.status}{(' - ' + r.detail) if r.detail else ''}"
                 f"{f' ({r.seconds:.0f} s)' if r.seconds else ''}" for r in results]
        bad = [f"  {n}: {o}" for n, o in outcomes.items() if not o.startswith(("PASSED", "SKIPPED", "XFAIL"))]
        if bad:
            lines += ["tests not passed:"] + bad
        lines.append(f"total {clock.elapsed():.0f} s of DEADLINE {clock.deadline:.0f} s")
        archive = pack(out_dir, logs, lines, since, results_dir)
        print(f"\n=== summary (t={clock.elapsed():.0f}s; everything in {archive}) ===")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
