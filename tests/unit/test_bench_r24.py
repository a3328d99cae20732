"""Round 24's review of the benchmarks: ``kill_resume`` with a relative ``--workdir`` and its clean-up (the
time limit, an error, SIGTERM), ``bench_service``'s interleaved run of one bento given twice, ``bench_cnn_retry``
without a photo where HOG misses, ``load_test``'s loopback check, and ``dlib_age_heads``' cache writes."""

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

# The benchmarks' main() turn SIGTERM into SystemExit (_server.exit_on_sigterm): put back for pytest.
pytestmark = pytest.mark.usefixtures("sigterm_restored")


# A stand-in ``dvc``: runs a "stage" (a sleep) in the background, writes its pid, waits for it.
FAKE_DVC = '#!/bin/sh\nsleep 300 &\necho $! > "$STAGE_PID_FILE"\nwait\n'


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def fake_dvc_env(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose ``dvc`` is :data:`FAKE_DVC`, and the file its stage's pid goes to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text(FAKE_DVC)
    (bin_dir / "dvc").chmod(0o755)
    pid_file = tmp_path / "stage.pid"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STAGE_PID_FILE": str(pid_file)}
    return env, pid_file


def wait_for(path: Path, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def gone(pid: int, timeout_s: float = 15) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def kill_if_alive(pid_file: Path) -> None:
    if pid_file.is_file() and pid_file.read_text().strip():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def make_sample(root: Path) -> Path:
    """A release-layout sample of one face per split (make_subset copies what the CSVs list)."""
    for i, split in enumerate(("train", "valid", "test")):
        (root / split).mkdir(parents=True)
        (root / split / f"{i:06d}.jpg").write_bytes(b"jpeg")
        (root / f"gt_avg_{split}.csv").write_text(
            "file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age\n" f"{i:06d}.jpg,0,30.0,0.0,30\n")
    return root


def test_kill_resume_with_a_relative_workdir_points_the_project_at_its_subset(tmp_path, monkeypatch):
    """DVC reads a relative fetch_data.source from the project's root: ``--workdir work`` named ``work/source``,
    which the reference run looked for under ``work/project`` and failed."""
    import benchmarks.kill_resume as kill_resume
    from faceage.paths import from_root

    sample = make_sample(tmp_path / "sample")
    seen = {}

    class Made(Exception):
        pass

    def make_project(root, source, **kwargs):
        seen.update(root=root, source=source)
        raise Made

    monkeypatch.setattr(kill_resume, "make_project", make_project)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(sample=sample, train=1, valid=1, test=1, epochs=1, image_size=64, batch_size=1,
                              kills=0, seed=0, workdir=Path("work"), json=None)
    with pytest.raises(Made):
        kill_resume.run(args)
    resolved = from_root(str(seen["source"]), seen["root"])  # what fetch_data reads in the project
    assert resolved.resolve() == (tmp_path / "work" / "source").resolve()
    assert (resolved / "gt_avg_train.csv").is_file()


def test_kill_resume_stops_dvc_and_the_stage_it_runs_at_the_time_limit(tmp_path):
    from benchmarks.kill_resume import repro

    env, pid_file = fake_dvc_env(tmp_path)
    root = tmp_path / "project"
    root.mkdir()
    try:
        result = repro(root, env, [], timeout=2)
        stage = wait_for(pid_file)
        assert result.killed_at is None
        assert gone(stage), "the stage dvc ran outlived the time limit (only dvc was killed)"
    finally:
        kill_if_alive(pid_file)


def test_kill_resume_stops_dvc_and_the_stage_on_an_error_while_watching(tmp_path, monkeypatch):
    import benchmarks.kill_resume as kill_resume

    env, pid_file = fake_dvc_env(tmp_path)
    root = tmp_path / "project"
    root.mkdir()

    def interrupted(root):  # Ctrl-C (or SIGTERM's SystemExit) while the stage runs
        if pid_file.is_file() and pid_file.read_text().strip():
            raise KeyboardInterrupt
        return None

    monkeypatch.setattr(kill_resume, "_train_pid", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            kill_resume.repro(root, env, [], timeout=60)
        assert gone(int(pid_file.read_text())), "dvc repro and its stage kept running after the script stopped"
    finally:
        kill_if_alive(pid_file)


def test_sigterm_to_kill_resume_stops_dvc_repro_and_removes_the_temporary_project(tmp_path):
    env, pid_file = fake_dvc_env(tmp_path)
    temp = tmp_path / "temp"
    temp.mkdir()
    sample = make_sample(tmp_path / "sample")
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        import benchmarks.kill_resume as k
        k.make_project = lambda root, source, **kwargs: dict(os.environ)  # no git/dvc init: the fake dvc runs
        sys.exit(k.main(["--sample", {str(sample)!r}, "--kills", "0", "--seed", "0"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env={**env, "TMPDIR": str(temp)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        stage = wait_for(pid_file)
        assert [p.name for p in temp.iterdir() if p.name.startswith("kill-resume-")]  # the project, in use
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 143
        assert gone(stage), "SIGTERM left dvc repro and its stage running"
        assert not [p.name for p in temp.iterdir() if p.name.startswith("kill-resume-")], "the project was left"
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_if_alive(pid_file)


def test_the_same_bento_twice_is_two_targets_in_the_interleaved_run():
    """An A/A run (one bento given twice: the noise floor) pooled both servers' requests under one name
    and gave no ratio."""
    from benchmarks.bench_service import interleaved_one_face, interleaved_ratios
    from tests.unit.test_bench_ratios import FakeTarget, Recorder

    Recorder.log = []
    targets = [FakeTarget("host face_age:x"), FakeTarget("host face_age:x")]
    photos = [(f"p{i}.jpg", b"x" * 10) for i in range(3)]
    latencies = interleaved_one_face(targets, photos, rounds=2, settle_s=0)
    assert {n: len(v) for n, v in latencies.items()} == {"host face_age:x #1": 6, "host face_age:x #2": 6}
    (q,) = interleaved_ratios(latencies)["ratios"]
    assert (q["target"], q["versus"]) == ("host face_age:x #2", "host face_age:x #1")
    assert all(t.stopped for t in targets)


def test_cnn_look_benchmark_without_a_photo_hog_missed_reports_n_a_and_strict_json(tmp_path, monkeypatch, capsys):
    import benchmarks.bench_cnn_retry as bench

    rows = [{"photo": "obama.jpg", "width": 10, "height": 10, "faces": 1, "faces_with_look": 1, "ms": 100.0,
             "ms_with_look": 101.0}]
    assert bench.summary(rows, {})["time_ratio_where_hog_found_none"] is None
    assert bench.summary([], {})["time_ratio_all_photos"] is None
    (tmp_path / "photos").mkdir()
    monkeypatch.setattr(bench, "FaceLocator", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench, "measure", lambda without, with_look, photos, rounds: rows)
    out = tmp_path / "out.json"
    assert bench.main(["--photos", str(tmp_path / "photos"), "--detector", str(tmp_path), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "n/a on the 0 photos where HOG found none, 1.01x over all photos" in printed and "nan" not in printed

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    summary = json.loads(out.read_text(), parse_constant=refuse)[str(tmp_path / "photos")]["summary"]
    assert summary["time_ratio_where_hog_found_none"] is None


@pytest.mark.parametrize("url", ["http://localhost.example.com:3000", "http://127.0.0.1.nip.io:3000",
                                 "http://localhost@example.com:3000"])
def test_load_test_refuses_a_url_that_only_begins_like_loopback(url, monkeypatch):
    import benchmarks.load_test as load_test

    def no_photos(folder):
        raise AssertionError(f"{url} was accepted")

    monkeypatch.setattr(load_test, "load_photos", no_photos)
    with pytest.raises(SystemExit, match="must be on 127.0.0.1"):
        load_test.main(["--url", url, "--requests", "1"])


def test_load_test_finds_the_server_of_a_url_without_a_port(monkeypatch):
    import psutil

    from benchmarks.load_test import server_pid

    conn = type("Conn", (), {"status": psutil.CONN_LISTEN, "laddr": type("A", (), {"port": 80})(), "pid": 4321})()
    monkeypatch.setattr(psutil, "net_connections", lambda kind: [conn])
    assert server_pid("http://127.0.0.1") == 4321 and server_pid("http://localhost/") == 4321
    assert server_pid("http://127.0.0.1:3000/") is None


def test_heads_cache_is_never_left_half_written(tmp_path, monkeypatch):
    """The cache is reused whenever its file exists: one stopped while being written failed every later run."""
    import faceage.chips
    import faceage.face_net
    import torch

    import benchmarks.dlib_age_heads as heads

    pair = np.zeros((3, 214, 150), np.uint8)
    monkeypatch.setattr(heads, "cache_dir", lambda repo=heads.REPO, **_: tmp_path / "cache")
    monkeypatch.setattr(heads, "_labelled_sources",
                        lambda: {s: (tmp_path, s) for s in ("train", "valid", "test", "ext")})
    monkeypatch.setattr(heads, "_split_crops", lambda faces_dir, split: (["a.png"], np.array([30.0], np.float32)))
    monkeypatch.setattr(heads, "_wild_faces", lambda detector: ([], [], [pair]))
    monkeypatch.setattr(heads, "_wild_files", lambda: ["a.jpg"])  # wild/labels.csv's check (none without ../shared)
    monkeypatch.setattr(faceage.chips, "load_chips", lambda path, pairs=False: ({"a.png": pair}, {}))
    net = type("Net", (), {"pooled_layers": lambda self, x: torch.zeros(len(x), 640)})()
    monkeypatch.setattr(faceage.face_net, "load_face_net", lambda path: net)
    real_savez = np.savez

    def interrupted(file, *args, **kwargs):  # Ctrl-C half-way through the write
        (open(file, "wb") if isinstance(file, (str, Path)) else file).write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        heads.face_layers(tmp_path)
    assert not (tmp_path / "cache" / "face-layers.npz").exists()
    assert not list((tmp_path / "cache").iterdir())  # no temporary file left either
    monkeypatch.setattr(np, "savez", real_savez)
    first = heads.face_layers(tmp_path)
    assert first["train"].shape == (1, 2, 640)
    again = heads.face_layers(tmp_path)  # from the cache
    assert all(np.array_equal(first[s], again[s]) for s in heads.SPLITS)


def test_service_benchmark_without_its_photos_or_a_bento_says_so(tmp_path, monkeypatch):
    """A clone without ../shared (the default photos) or without a bento: a message, not a traceback."""
    import bentoml

    import benchmarks.bench_service as bench
    from benchmarks.load_test import main as load_test_main

    with pytest.raises(SystemExit, match=r"--photos .*nowhere.* is not a folder of photos"):
        bench.main(["--photos", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match=r"--photos .*nowhere.* is not a folder of photos"):
        load_test_main(["--photos", str(tmp_path / "nowhere")])

    def missing(tag):
        raise bentoml.exceptions.NotFound(f"no Bentos with name {tag!r} exist in BentoML store")

    monkeypatch.setattr(bentoml, "get", missing)
    photos = REPO / "faceage" / "examples"
    with pytest.raises(SystemExit, match="no Bentos with name 'face_age:latest'.*make bento"):
        bench.main(["--photos", str(photos)])
