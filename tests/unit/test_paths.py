"""The repo root and the download cache, also from inside a ``dvc exp run --temp`` / ``--queue`` copy."""

from faceage.paths import downloads_dir, repo_root


def test_temp_runs_address_the_workspace_they_were_copied_from(tmp_path):
    project = tmp_path / "project"
    run = project / ".dvc" / "tmp" / "exps" / "tmpk2x9"
    run.mkdir(parents=True)
    assert repo_root(run) == project.resolve()
    assert repo_root(run / "stages") == project.resolve()
    assert downloads_dir(run) == project.resolve() / ".cache" / "downloads"


def test_a_workspace_is_its_own_root(tmp_path, monkeypatch):
    assert repo_root(tmp_path) == tmp_path.resolve()
    monkeypatch.chdir(tmp_path)
    assert downloads_dir() == tmp_path.resolve() / ".cache" / "downloads"
