"""Round 29 review of the pipeline's wiring: dvc.yaml's stage commands, .ci/run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MARKER = "faceage imported from the copy under test"


def python_stage_commands() -> dict[str, str]:
    """``{stage: cmd}`` for the dvc.yaml stages that run ``python stages/<x>.py``."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: s["cmd"] for name, s in stages.items() if re.search(r"python\s+stages/\w+\.py", s["cmd"])}


@pytest.fixture(scope="module")
def temp_run_copy(tmp_path_factory) -> Path:
    """The project as ``dvc exp run --temp`` / ``--queue`` runs it: a copy under ``.dvc/tmp/exps/``, run with the
    workspace's venv, whose editable install of ``faceage`` points at the workspace. The copy's package says
    when it is imported."""
    root = tmp_path_factory.mktemp("workspace") / ".dvc" / "tmp" / "exps" / "tmpr29"
    root.mkdir(parents=True)
    for folder in ("faceage", "stages"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / file, root / file)
    init = root / "faceage" / "__init__.py"
    init.write_text(init.read_text() + f"\nimport sys as _s\n_s.stderr.write({MARKER!r} + '\\n')\n")
    return root


@pytest.mark.parametrize("stage", sorted(python_stage_commands()))
def test_a_stage_in_a_dvc_temp_run_imports_the_faceage_of_its_own_copy(stage, temp_run_copy):
    """`dvc exp run --temp`/`--queue` runs each experiment in a copy of the workspace (``.dvc/tmp/exps/...``) with
    the same venv. ``python stages/x.py`` puts only ``stages/`` on ``sys.path``, so ``import faceage`` found the
    editable install: the workspace's code as it is when the queued run starts, not the code the experiment
    committed and its ``dvc.lock`` records the hashes of (a queued run after an edit ran the edited code)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `python`: this venv's
    # DVC runs a stage's cmd in a shell; --help stops each stage after its imports, before any work.
    done = subprocess.run(["/bin/sh", "-c", python_stage_commands()[stage] + " --help"], cwd=temp_run_copy, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert MARKER in done.stderr, (f"stage {stage!r} run in {temp_run_copy} imported faceage from elsewhere "
                                   f"(the venv's editable install): {done.stderr[-1000:]}")


STUB = "#!/bin/sh\n{body}\n"
# The commands .ci/run runs besides its shell's builtins and the stubs below: the system's own.
SYSTEM_TOOLS = ("dirname", "seq", "sleep", "tail", "nohup", "chmod", "cat", "setsid", "mktemp", "rm")


def ci_machine(tmp_path: Path, have: set[str], make: str = "", base_image: str = "") -> tuple[Path, dict[str, str], Path]:
    """A CI machine for ``.ci/run``: a clone holding it (its base-image script and ``make`` recorded, not run),
    the shared datasets, and on ``PATH`` only the tools in ``have`` (of chromium, dockerd, debootstrap: a working
    Docker daemon comes with dockerd) and an ``apt-get`` that records its calls and installs what it is asked for."""
    repo, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "calls.log"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(REPO / ".ci" / "run", repo / ".ci" / "run")
    (repo / "scripts").mkdir()
    bin_dir.mkdir()
    datasets = tmp_path / "shared" / "datasets"
    for sub in ("appa-real-sample", "wild", "utk-external"):
        (datasets / sub).mkdir(parents=True)

    def stub(path: Path, body: str) -> None:
        path.write_text(STUB.format(body=body))
        path.chmod(0o755)

    stub(repo / "scripts" / "base-image.sh", f'{base_image}echo "base-image.sh" >> "{log}"')
    stub(bin_dir / "make", f'echo "make $*" >> "{log}"\n{make}')
    tools = {"chromium": ["chromium"], "dockerd": ["dockerd", "docker"], "debootstrap": ["debootstrap"]}
    packages = {"chromium": "chromium", "docker.io": "dockerd", "debootstrap": "debootstrap"}
    installs = "\n".join(
        f'  {package}) for t in {" ".join(tools[tool])}; do printf "#!/bin/sh\\nexit 0\\n" > "{bin_dir}/$t"; '
        f'chmod 755 "{bin_dir}/$t"; done;;' for package, tool in packages.items())
    stub(bin_dir / "apt-get", f'echo "apt-get $*" >> "{log}"\n[ "$1" = install ] || exit 0\n'
                              f'for p in "$@"; do case "$p" in\n{installs}\nesac; done')
    for tool in have:
        for name in tools[tool]:
            stub(bin_dir / name, "exit 0")
    for tool in SYSTEM_TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "FACEAGE_SHARED_DATASETS": str(datasets)}
    return repo, env, log


def installed_packages(log: Path) -> set[str]:
    """The packages ``apt-get install`` was asked for, in all its calls."""
    return {p for line in log.read_text().splitlines() if line.startswith("apt-get install")
            for p in line.split()[2:] if not p.startswith("-")}


def test_ci_keeps_an_installed_docker_engine_when_only_debootstrap_is_missing(tmp_path):
    """A CI host with a Docker engine but no debootstrap (Docker's own packages: docker-ce, containerd.io) got
    `apt-get install docker.io debootstrap`: Debian's engine, whose containerd and runc conflict with
    containerd.io, so `-y` swaps the running engine out, for want of debootstrap alone."""
    repo, env, log = ci_machine(tmp_path, have={"chromium", "dockerd"})
    done = subprocess.run([shutil.which("bash"), ".ci/run"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert installed_packages(log) == {"debootstrap"}
    # (the base image builds in the background meanwhile)
    assert [line for line in log.read_text().splitlines() if line.startswith("make")] == ["make setup", "make test"]


def test_ci_installs_every_missing_tool_on_a_fresh_machine(tmp_path):
    repo, env, log = ci_machine(tmp_path, have=set())
    done = subprocess.run([shutil.which("bash"), ".ci/run"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert installed_packages(log) == {"chromium", "docker.io", "debootstrap"}
    assert "base-image.sh" in log.read_text().splitlines()
    # (the base image builds in the background meanwhile)
    assert [line for line in log.read_text().splitlines() if line.startswith("make")] == ["make setup", "make test"]


def declared_outs(spec: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", [])]


@pytest.mark.parametrize("stage", sorted(python_stage_commands()))
def test_the_cmd_names_where_each_declared_output_goes(stage):
    """dvc.yaml's cmd is the one place a stage's paths are spelled out: each output DVC expects is passed to the
    script (the file, or the folder it is written in). check_sources wrote data/pretrained.json because the
    script's default said so: renaming it in faceage/sources.py left DVC waiting for a file no run wrote."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    words = spec["cmd"].split()
    unnamed = [out for out in declared_outs(spec)
               if out not in words and not any(p.as_posix() in words for p in Path(out).parents if p != Path("."))]
    assert not unnamed, f"dvc.yaml: stage {stage!r} declares {unnamed} but its cmd does not pass them: {spec['cmd']}"


def test_a_failed_setup_stops_the_base_image_build_behind_it(tmp_path):
    """`make setup` failing ended .ci/run (set -e) while the base image's debootstrap and `docker import` went on
    in the background, behind a failed job; its log was one fixed /tmp path two jobs on a machine shared."""
    import time

    repo, env, log = ci_machine(tmp_path, have={"chromium", "dockerd", "debootstrap"},
                                make='[ "$1" = setup ] && exit 2', base_image="sleep 3\n")
    done = subprocess.run([shutil.which("bash"), ".ci/run"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    time.sleep(4)  # past the build's 3 s: it would have logged by now
    assert "base-image.sh" not in log.read_text().splitlines()
    assert [line for line in log.read_text().splitlines() if line.startswith("make")] == ["make setup"]
