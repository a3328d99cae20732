"""The Makefile and scripts/base-image.sh as a user runs them: a .venv left without pip, a repo or a SAMPLE
with a space in its path, and a bentofile with no docker.base_image (the README's Docker Hub path).

Each test copies the file under test into a temp folder and runs it for real with stand-ins for the
tools it calls (a fake .venv/bin/python that records its arguments, a `docker` that always fails), so
nothing is installed, built or started.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def recorder(path: Path, log: Path) -> Path:
    """An executable that appends its arguments (a JSON list, its own name first) to ``log``."""
    return executable(path, f"#!{sys.executable}\nimport json, os, sys\n"
                            f"with open({str(log)!r}, 'a') as f:\n"
                            f"    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n")


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def make_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copy(REPO / "Makefile", root / "Makefile")
    (root / "pyproject.toml").write_text("")
    (root / "bento-requirements.txt").write_text("")
    return root


def run_make(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SAMPLE", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=60)


def test_make_setup_recovers_from_a_venv_without_pip(tmp_path):
    """A .venv whose creation stopped before ensurepip (Ctrl-C, or Debian without python3-venv) has
    bin/python but no pip: `test -x .venv/bin/python` skipped the venv step, and every later `make setup`
    failed with "No module named pip" until the user deleted .venv."""
    repo = make_repo(tmp_path / "repo")
    has_pip = repo / ".venv" / "has-pip"
    log = tmp_path / "python.log"
    executable(repo / ".venv" / "bin" / "python", f"""#!/bin/sh
echo "$*" >> {log}
if [ "$1" = -m ] && [ "$2" = pip ] && [ ! -e {has_pip} ]; then
  echo "{repo}/.venv/bin/python: No module named pip" >&2; exit 1
fi
exit 0
""")
    # The base interpreter: `python3 -m venv .venv` over the half-made one adds pip (checked with a real venv).
    base = executable(tmp_path / "python3", f"#!/bin/sh\n[ \"$*\" = '-m venv .venv' ] && touch {has_pip}\n")
    result = run_make(repo, "setup", f"PY={base}")
    assert result.returncode == 0, result.stderr
    assert has_pip.exists() and (repo / ".venv" / ".installed").exists()
    assert "-m pip install -q -e .[test] -c bento-requirements.txt" in log.read_text()

    # A healthy .venv is left alone: no second venv step.
    (repo / ".venv" / ".installed").unlink()
    base.write_text(f"#!/bin/sh\necho called > {tmp_path / 'base-called'}\n")
    assert run_make(repo, "setup", f"PY={base}").returncode == 0
    assert not (tmp_path / "base-called").exists()


@pytest.fixture
def spaced_repo(tmp_path):
    """A repo at `<tmp>/my work/faceage` with ../shared, whose .venv/bin tools record their arguments."""
    repo = make_repo(tmp_path / "my work" / "faceage")
    (repo.parent / "shared" / "datasets" / "appa-real-sample").mkdir(parents=True)
    log = tmp_path / "calls.log"
    for tool in ("python", "mlflow"):
        recorder(repo / ".venv" / "bin" / tool, log)
    (repo / ".venv" / ".installed").touch()
    return repo, log


@pytest.mark.parametrize("sample, source", [
    (None, "{parent}/shared/datasets/appa-real-sample"),  # the default, under a folder with a space
    ("/data/my faces/sample", "/data/my faces/sample"),
    ("'/a,b/sample'", "/a,b/sample"),  # the README's Hydra-quoted form for `make quick`
    ('"/a,b/sample"', "/a,b/sample"),
    ("/home/José/sample", "/home/José/sample"),
    ("'/data/it\\'s, x/sample'", "/data/it's, x/sample"),  # a quote escaped inside Hydra's quotes, as the README says
    ('"/data/say \\"hi\\", x/sample"', '/data/say "hi", x/sample'),
])
def test_make_sweep_passes_the_sample_as_one_path(spaced_repo, sample, source):
    """`--source $(SAMPLE)` unquoted: a path with a space reached faceage.sweep as two arguments
    ("unrecognized arguments: work/shared/datasets/appa-real-sample")."""
    repo, log = spaced_repo
    result = run_make(repo, "-o", ".venv/.installed", "sweep", *([f"SAMPLE={sample}"] if sample else []))
    assert result.returncode == 0, result.stderr
    [call] = calls(log)
    assert call == ["python", "-m", "faceage.sweep", "--profile", "cpu", "--source",
                    source.format(parent=repo.parent)]


def test_make_mlflow_server_with_a_space_in_the_repo_path(spaced_repo):
    """The default backend and artifact paths are under the repo: unquoted, mlflow said
    "Got unexpected extra arguments (work/faceage/mlflow-server.db work/faceage/mlartifacts)"."""
    repo, log = spaced_repo
    result = run_make(repo, "-o", ".venv/.installed", "mlflow-server", "MLFLOW_ALLOWED_HOSTS=mlflow-host:5000")
    assert result.returncode == 0, result.stderr
    [*_, call] = calls(log)  # the python -c that lists MLflow's default hosts runs first
    assert call[0] == "mlflow"
    def arg(option: str) -> str:
        return call[call.index(option) + 1]

    assert arg("--backend-store-uri") == f"sqlite:///{repo}/mlflow-server.db"
    assert arg("--artifacts-destination") == f"{repo}/mlartifacts"
    assert arg("--allowed-hosts").startswith("mlflow-host:5000,")


def base_image_copy(tmp_path: Path, bentofile: str) -> tuple[Path, dict]:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "base-image.sh", root / "scripts" / "base-image.sh")
    (root / "bentofile.yaml").write_text(bentofile)
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "docker", "#!/bin/sh\necho 'docker: no daemon here' >&2\nexit 1\n")
    return root, {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_base_image_does_nothing_when_the_bentofile_names_none(tmp_path):
    """README, "Default path (a machine with Docker Hub)": delete the base_image line and BentoML starts
    from python:3.11-slim. `make container` still ran scripts/base-image.sh first, which stopped it:
    "no image name: pass one or set docker.base_image in bentofile.yaml" (exit 2)."""
    text = (REPO / "bentofile.yaml").read_text()
    without = "".join(line for line in text.splitlines(keepends=True) if not line.strip().startswith("base_image:"))
    assert without != text
    root, env = base_image_copy(tmp_path, without)
    result = subprocess.run(["bash", str(root / "scripts" / "base-image.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "nothing to build" in result.stdout + result.stderr


def test_base_image_named_still_needs_a_daemon(tmp_path):
    root, env = base_image_copy(tmp_path, (REPO / "bentofile.yaml").read_text())
    result = subprocess.run(["bash", str(root / "scripts" / "base-image.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "no Docker daemon reachable" in result.stderr
