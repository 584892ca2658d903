"""Packaging: the declared metadata matches what the code imports, and bad build set-ups stop with one line.

setup.py runs in a subprocess with the real torch, its version or CUDA build patched where a test needs
another one, exactly as pip runs it (``setup.py --name`` evaluates everything a build decides without
compiling). The fresh-venv installs themselves are `scripts/check_install.sh` (part of `make test`).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "setup.py"
needs_source = pytest.mark.skipif(not SETUP.exists(), reason="needs the source tree (setup.py)")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _req_name(req: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("_", "-")


# One subprocess runs setup.py for every scenario (importing torch once is most of the cost), as pip runs
# it: ``setup.py --name`` evaluates everything a build decides without compiling. Each scenario patches the
# real torch (version, CUDA build) and sets the environment; its stdout, stderr and exit code are kept, and
# an exception other than SystemExit is reported as the traceback Python would print.
_DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback
import torch
scenarios = json.loads(sys.argv[1])
real = {"version": torch.__version__, "cuda": torch.version.cuda}
results = {}
for name, (patch, env) in scenarios.items():
    saved_env = dict(os.environ)
    for k in ("FORCE_CUDA", "STSSA_NO_CUDA", "CUDA_HOME", "CUDA_PATH"):
        os.environ.pop(k, None)
    os.environ.update(env)
    torch.__version__, torch.version.cuda = real["version"], real["cuda"]
    saved_torch = sys.modules["torch"]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            exec(patch)
            sys.argv = ["setup.py", "--name"]
            runpy.run_path("setup.py", run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    sys.modules["torch"] = saved_torch
    os.environ.clear(); os.environ.update(saved_env)
    results[name] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
# Last: importing the package under a torch older than 2.10.
torch.__version__ = "2.9.1"
try:
    import stssa_kernels
    results["import"] = "imported"
except ImportError as e:
    results["import"] = f"ImportError: {e}"
print(json.dumps(results))
"""
def _our_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("[stssa-kernels]")]


def _assert_one_line_failure(r, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = _our_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("[stssa-kernels] error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


CUDA_TORCH = "import torch; torch.version.cuda = '13.0'"   # a CUDA build of torch, whatever is installed
CPU_TORCH = "import torch; torch.version.cuda = None"


def _fake_cuda_home(home: Path, release: str) -> Path:
    """A CUDA_HOME whose bin/nvcc reports ``release`` (and which has the runtime header the lookup wants)."""
    (home / "bin").mkdir(parents=True, exist_ok=True)
    (home / "include").mkdir(exist_ok=True)
    (home / "include" / "cuda_runtime.h").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    nvcc.chmod(0o755)
    return home


class _Run:
    def __init__(self, d):
        self.returncode, self.stdout, self.stderr = d["returncode"], d["stdout"], d["stderr"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> result of setup.py in that scenario; "import" -> how ``import stssa_kernels`` fails on torch 2.9."""
    if not SETUP.exists():
        pytest.skip("needs the source tree (setup.py)")
    tmp = tmp_path_factory.mktemp("cuda")
    empty = str(tmp / "empty")
    os.mkdir(empty)
    cuda13, cuda12 = (str(_fake_cuda_home(tmp / f"cuda{r}", r)) for r in ("13.0", "12.4"))
    scenarios = {
        "no_torch": ("sys.modules['torch'] = None", {}),
        "old_torch": ("torch.__version__ = '2.9.1'", {}),
        "no_nvcc": (CUDA_TORCH, {"CUDA_HOME": empty}),
        "cpu_torch": (CPU_TORCH, {"CUDA_HOME": cuda13}),
        "no_cuda_switch": (CUDA_TORCH, {"STSSA_NO_CUDA": "1", "FORCE_CUDA": "1"}),
        "force_no_nvcc": (CUDA_TORCH, {"FORCE_CUDA": "1", "CUDA_HOME": empty}),
        "force_cpu_torch": (CPU_TORCH + "; torch.__version__ = '2.13.0+cpu'", {"FORCE_CUDA": "1", "CUDA_HOME": cuda13}),
        "force_neither": (CPU_TORCH, {"FORCE_CUDA": "1", "CUDA_HOME": empty}),
        "mismatch": (CUDA_TORCH, {"CUDA_HOME": cuda12}),
        "force_mismatch": (CUDA_TORCH, {"CUDA_HOME": cuda12, "FORCE_CUDA": "1"}),
    }
    r = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(scenarios)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out = {k: (v if k == "import" else _Run(v)) for k, v in out.items()}
    out["empty"], out["cuda12"] = empty, cuda12
    return out


# ------------------------------------------------------------------------------------------ metadata
def test_pyproject_build_requires_and_version():
    meta = _pyproject()
    requires = meta["build-system"]["requires"]
    assert "torch>=2.10" in requires and any(_req_name(r) == "setuptools" for r in requires)
    assert meta["build-system"]["build-backend"] == "setuptools.build_meta"
    import stssa_kernels
    assert meta["project"]["version"] == stssa_kernels.__version__
    assert "torch>=2.10" in meta["project"]["dependencies"]


# What an import name is installed as; optional ones are imported only on the paths that need them.
DISTRIBUTION = {"torch": "torch", "numpy": "numpy", "yaml": "pyyaml", "tqdm": "tqdm", "matplotlib": "matplotlib",
                "PIL": "pillow", "av": "av"}
OPTIONAL = {"torchvision": "reference", "tensorboard": "train",
            "triton": None}  # triton comes with the CUDA builds of torch; CPU-only torch runs without it


def _third_party_imports(package: Path) -> dict[str, str]:
    """Top-level modules imported anywhere in ``package`` that are neither stdlib nor the project."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("stssa", "stssa_kernels", "__future__"):
                    found.setdefault(top, f"{package.name}/{path.relative_to(package)}")
    return found


def test_every_import_of_the_packages_is_a_declared_dependency():
    import stssa
    import stssa_kernels

    meta = _pyproject()
    declared = {_req_name(r) for r in meta["project"]["dependencies"]}
    extras = {k: {_req_name(r) for r in v} for k, v in meta["project"]["optional-dependencies"].items()}
    imports = {}
    for pkg in (stssa_kernels, stssa):  # the imported copies: the source tree or an installed wheel
        imports.update(_third_party_imports(Path(pkg.__file__).resolve().parent))
    for top, where in imports.items():
        if top in DISTRIBUTION:
            assert DISTRIBUTION[top] in declared, f"{where} imports {top}: add {DISTRIBUTION[top]} to dependencies"
        elif top in OPTIONAL:
            extra = OPTIONAL[top]
            assert extra is None or top in extras[extra], f"{where} imports {top}: declare it in extra {extra!r}"
        else:
            pytest.fail(f"{where} imports {top}, which pyproject.toml does not declare (and this test does not know)")
    for dist in declared:
        assert dist in {DISTRIBUTION[m] for m in imports if m in DISTRIBUTION}, f"{dist} is declared but not imported"


@needs_source
def test_requirements_pins_satisfy_the_declared_dependencies():
    specifiers = pytest.importorskip("packaging.specifiers")
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.-]+)==([^\s#;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    for req in _pyproject()["project"]["dependencies"]:
        name, spec = _req_name(req), req[len(_req_name(req)):]
        if name in pins:
            assert specifiers.SpecifierSet(spec).contains(pins[name]), f"requirements.txt pins {name}=={pins[name]}, "\
                f"outside pyproject.toml's {req}"


def test_readme_install_section_leads_with_plain_editable_install():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install", 1)[1]
    first_code = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert first_code.splitlines()[0].split("#")[0].strip() == "pip install -e ."


def test_installed_package_is_the_one_under_test():
    """In scripts/check_install.sh's venv B the suite must test the installed wheel, not a source tree."""
    where = os.environ.get("STSSA_EXPECT_INSTALLED_UNDER")
    if not where:
        pytest.skip("only inside scripts/check_install.sh")
    import stssa
    import stssa_kernels
    for mod in (stssa, stssa_kernels):
        assert os.path.realpath(mod.__file__).startswith(os.path.realpath(where) + os.sep), mod.__file__


# --------------------------------------------------------------------------------- bad build set-ups
def test_setup_without_torch_says_so_in_one_line(runs):
    _assert_one_line_failure(runs["no_torch"], "needs torch >= 2.10 to build", "torch does not import here",
                             "--no-build-isolation")


def test_setup_with_torch_older_than_2_10_says_so_in_one_line(runs):
    line = _assert_one_line_failure(runs["old_torch"], "needs torch >= 2.10, found 2.9.1")
    assert "upgrade torch" in line


def test_setup_without_nvcc_builds_cpu_only_and_says_why(runs):
    r = runs["no_nvcc"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "stssa-kernels"
    assert _our_lines(r.stderr) == [
        f"[stssa-kernels] building the CPU kernels only: no nvcc found (looked in CUDA_HOME={runs['empty']}; "
        "install the CUDA toolkit or set CUDA_HOME)"], r.stderr


def test_setup_with_cpu_only_torch_builds_cpu_only_and_says_why(runs):
    r = runs["cpu_torch"]
    assert r.returncode == 0, r.stderr
    lines = _our_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("[stssa-kernels] building the CPU kernels only: torch "), r.stderr
    assert lines[0].endswith("is a CPU-only build (a CUDA build of torch is needed)")


def test_setup_no_cuda_switch(runs):
    r = runs["no_cuda_switch"]
    assert r.returncode == 0, r.stderr
    assert _our_lines(r.stderr) == ["[stssa-kernels] building the CPU kernels only: STSSA_NO_CUDA=1"]


def test_force_cuda_without_nvcc_fails_naming_nvcc(runs):
    line = _assert_one_line_failure(runs["force_no_nvcc"], "FORCE_CUDA=1 but the CUDA kernels cannot be compiled",
                                    "no nvcc found", f"CUDA_HOME={runs['empty']}")
    assert "CPU-only" not in line


def test_force_cuda_with_cpu_only_torch_fails_naming_torch(runs):
    line = _assert_one_line_failure(runs["force_cpu_torch"],
                                    "torch 2.13.0+cpu is a CPU-only build (a CUDA build of torch is needed)")
    assert "nvcc" not in line


def test_force_cuda_without_either_names_both(runs):
    _assert_one_line_failure(runs["force_neither"], "is a CPU-only build", "no nvcc found")


def test_nvcc_and_torch_cuda_major_mismatch(runs):
    r = runs["mismatch"]
    assert r.returncode == 0, r.stderr
    why = "nvcc is CUDA 12.4 but torch"
    assert any(ln.startswith("[stssa-kernels] building the CPU kernels only: ") and why in ln
               for ln in _our_lines(r.stderr)), r.stderr
    _assert_one_line_failure(runs["force_mismatch"], why, "with CUDA 13.0 (the major versions must match)")


@needs_source
def test_force_cuda_failure_through_pip_is_one_line_not_a_traceback(tmp_path):
    """What a user sees: pip's own frame around exactly our line (no build is attempted)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("needs setuptools for a --no-build-isolation build")
    env = {k: v for k, v in os.environ.items() if k not in ("STSSA_NO_CUDA", "PIP_BUILD_CONSTRAINT")}
    env.update(FORCE_CUDA="1", CUDA_HOME=str(tmp_path), PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                        str(tmp_path / "dist"), str(ROOT)], env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "Traceback" not in out, out
    ours = [ln.strip() for ln in out.splitlines() if "[stssa-kernels] error:" in ln]
    assert len(ours) == 1 and "FORCE_CUDA=1 but the CUDA kernels cannot be compiled: " in ours[0], out
    assert not list((tmp_path / "dist").glob("*.whl"))


# ----------------------------------------------------------------------------------- import-time check
def test_import_with_torch_older_than_2_10_is_one_clear_error(runs):
    assert runs["import"] == "ImportError: stssa-kernels needs torch >= 2.10, found 2.9.1"
