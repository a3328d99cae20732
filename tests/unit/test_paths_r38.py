"""Round 38: the project root from a subfolder of the project (``cd reports && python -m ...``)."""

import os
import subprocess
import sys
from pathlib import Path

from faceage.paths import downloads_dir, from_root, repo_root

REPO = Path(__file__).resolve().parents[2]


def make_project(where: Path) -> Path:
    """A DVC project as a user has one: dvc.yaml and params.yaml at its root, subfolders below."""
    where.mkdir(parents=True)
    (where / "dvc.yaml").write_text("stages: {}\n")
    (where / "params.yaml").write_text("train: {}\n")
    (where / "reports" / "figures").mkdir(parents=True)
    return where.resolve()


def test_a_subfolder_of_the_project_addresses_the_project_root(tmp_path):
    """From ``reports/`` the subfolder was taken as the root: mlflow.db, .cache/downloads and the params' relative
    paths landed in it (a second, empty tracking store; a second download of the same files)."""
    project = make_project(tmp_path / "project")
    assert repo_root(project / "reports") == project
    assert repo_root(project / "reports" / "figures") == project
    assert downloads_dir(project / "reports") == project / ".cache" / "downloads"
    assert from_root("../shared/datasets", project / "reports") == project / "../shared/datasets"
    assert repo_root(project) == project


def test_the_tracking_store_of_a_command_run_in_a_subfolder_is_the_projects(tmp_path):
    """A real process started in the subfolder, as a user's shell starts it: its default store is the root's."""
    project = make_project(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    code = "from faceage.tracking import tracking_uri; from faceage.paths import downloads_dir; " \
           "print(tracking_uri()); print(downloads_dir())"
    out = subprocess.run([sys.executable, "-c", code], cwd=project / "reports", env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    uri, downloads = out.stdout.split("\n")[:2]
    assert uri == f"sqlite:///{project / 'mlflow.db'}"
    assert downloads == str(project / ".cache" / "downloads")


def test_temp_runs_and_nested_projects_keep_their_own_root(tmp_path):
    """A ``dvc exp run --temp`` copy holds its own dvc.yaml and params.yaml: it still addresses the workspace it was
    copied from. A project inside another folder with a dvc.yaml higher up is its own (the nearest one, as DVC
    reads the dvc.yaml of the folder it runs in)."""
    project = make_project(tmp_path / "project")
    run = make_project(project / ".dvc" / "tmp" / "exps" / "tmpk2x9")
    assert repo_root(run) == project
    assert repo_root(run / "reports") == project
    inner = make_project(project / "reports" / "other-project")
    assert repo_root(inner / "reports") == inner


def test_a_folder_outside_any_project_is_its_own_root(tmp_path):
    """The service (a bento's folder) runs outside any project: nothing above it holds a dvc.yaml."""
    bento = tmp_path / "bentos" / "face_age" / "abc" / "src"
    bento.mkdir(parents=True)
    assert repo_root(bento) == bento.resolve()


def test_the_recipe_run_from_a_subfolder_reads_the_projects_params_and_outputs(tmp_path):
    """``cd reports && python -m faceage.recipe``: "params.yaml not found" (the subfolder's), and every default
    (data/faces, models/detector, reports/recipe.md) named a file in the subfolder."""
    project = make_project(tmp_path / "project")
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-m", "faceage.recipe"], cwd=project / "reports", env=env,
                         capture_output=True, text=True, timeout=600)
    assert "not found" not in out.stderr, out.stderr[-2000:]
    # Past the params and the tracking store (the project's), it stops at the first input this project lacks
    assert out.returncode != 0 and "recipe: the dlib_face descriptors" in out.stderr, out.stderr[-2000:]
    assert "../data/faces" in out.stderr.splitlines()[-1], out.stderr[-2000:]
    assert (project / "mlflow.db").is_file() and not (project / "reports" / "mlflow.db").exists()
    assert not (project / "reports" / "reports").exists()
