"""Round 29's review of the benchmarks: which side goes first alternates from round to round and a warm-up
pass is never timed (``frozen_runtime``, ``bench_container``), a count it cannot run with is refused before
any work, and ``--json`` never leaves a half-written file. Stand-ins for the model and the servers only: the
timing loops, the ONNX export and the file writes are the real ones."""

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]

# The benchmarks' main() turn SIGTERM into SystemExit (_server.exit_on_sigterm): put back for pytest.
pytestmark = pytest.mark.usefixtures("sigterm_restored")

PASS_S = 0.02  # what every pass of either side costs, so that the ratio of two equal sides is about 1
FIRST_PASS_S = 0.6  # what the first pass at the measured batch size costs more (allocations)


class _Frozen(nn.Module):
    """A frozen network whose passes take ``PASS_S``, and whose first pass after the runner is built takes
    ``FIRST_PASS_S`` more; each pass is logged (``torch``)."""

    def __init__(self, log: list[str]):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 2)
        self.log = log
        self.armed = False  # set once the ONNX runner is built: what runs from then on is the benchmark's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            self.log.append("torch")
            time.sleep(PASS_S + (FIRST_PASS_S if self.log.count("torch") == 1 else 0.0))
        return self.fc(x.flatten(1))


def test_frozen_runtime_alternates_who_goes_first_and_never_times_the_first_pass(tmp_path, monkeypatch, capsys):
    """torch always ran before ONNX Runtime in every round (the comment said 'alternate'), and the first
    torch pass at the measured batch size, which allocates, was one of the timed ones: with ``--rounds 2``
    the median is the mean of two, and a 0.6 s first pass against 0.02 s passes printed 0.07x for two equal
    sides."""
    import benchmarks.frozen_runtime as bench
    from faceage.ort_module import OrtModule

    log: list[str] = []
    graph = _Frozen(log)

    class Runner(OrtModule):  # the real export and session; its passes take PASS_S too, and are logged
        def __init__(self, module, example, **kwargs):
            super().__init__(module, example, **kwargs)
            module.armed = True

        def __call__(self, x):
            log.append("onnx")
            time.sleep(PASS_S)
            return super().__call__(x)

    monkeypatch.setattr(bench, "AgeModel", lambda path, device: SimpleNamespace(
        meta={"backbone": "resnet18", "image_size": 8}, graph=graph, model=graph))
    monkeypatch.setattr(bench, "load_split", lambda *a, **k: SimpleNamespace(images=torch.rand(16, 3, 8, 8)))
    monkeypatch.setattr(bench, "reads_pairs", lambda meta: False)
    monkeypatch.setattr(bench, "OrtModule", Runner)
    (tmp_path / "model.pt").write_bytes(b"x")
    (tmp_path / "manifest.csv").write_text("x\n")
    bench.main(["--model", str(tmp_path / "model.pt"), "--faces-dir", str(tmp_path), "--faces", "16",
                "--batch", "16", "--threads", "1", "--rounds", "2"])
    ratio = float(re.search(r"ratio ([0-9.]+)x", capsys.readouterr().out).group(1))
    assert 0.5 < ratio < 2, f"two sides of equal cost measured {ratio}x: the slow first pass was timed"
    pairs = {tuple(log[i:i + 2]) for i in range(0, len(log), 2)}
    assert pairs == {("torch", "onnx"), ("onnx", "torch")}, f"the order never alternated: {log}"


def _container_stand_ins(bench, monkeypatch, order: list[str]) -> None:
    """``bench_container``'s host and container cold starts, recorded in ``order``: no bento, no Docker."""
    monkeypatch.setattr(bench, "host_cold_start", lambda tag, timeout_s: order.append("host") or 1.0)
    monkeypatch.setattr(bench.ContainerTarget, "start", lambda self: order.append("container") or ("url", 1.5))
    monkeypatch.setattr(bench.ContainerTarget, "stop", lambda self: None)
    monkeypatch.setattr(bench.ContainerTarget, "size_bytes", lambda self: 10**9)


def test_container_benchmark_alternates_which_cold_start_goes_first(monkeypatch, capsys):
    """The host's cold start always came first in a round, the container's always right after the host server
    stopped: the docstring's 'the two alternate' held only as host, container, host, container."""
    import benchmarks.bench_container as bench

    order: list[str] = []
    _container_stand_ins(bench, monkeypatch, order)
    bench.main(["--rounds", "4"])
    assert order.count("host") == order.count("container") == 4
    pairs = [tuple(order[i:i + 2]) for i in range(0, len(order), 2)]
    assert pairs == [("host", "container"), ("container", "host")] * 2, order
    assert "container / host: 1.50x" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--timeout", "0"]], ids=" ".join)
def test_container_benchmark_refuses_what_it_cannot_run_before_any_start(bad, monkeypatch, capsys):
    """``--rounds 0`` read the image's size, then ended in statistics' 'no median for empty data' traceback;
    ``--timeout 0`` gave up on a server it gave no time to start."""
    import benchmarks.bench_container as bench

    order: list[str] = []
    _container_stand_ins(bench, monkeypatch, order)
    with pytest.raises(SystemExit) as e:
        bench.main(bad)
    assert e.value.code == 2 and "--rounds must be >= 1 and --timeout > 0" in capsys.readouterr().err
    assert not order


# Each benchmark's main() up to its --json write, in a process whose files may not grow past 64 bytes (what a
# full disk or a quota does to the write; SIGXFSZ ignored, so the write fails with EFBIG as on a full disk).
JSON_RUNS = {
    "bench_detect": """
        import yaml
        from benchmarks import bench_detect
        params = yaml.safe_load(open({repo!r} + "/params.yaml"))
        params["preprocess"]["cnn_retry_side"] = 0  # a HOG-only detector folder
        open({tmp!r} + "/params.yaml", "w").write(yaml.safe_dump(params))
        os.mkdir({tmp!r} + "/photos")
        limit()
        bench_detect.main(["--photos", {tmp!r} + "/photos", "--params", {tmp!r} + "/params.yaml",
                           "--detector", {detector!r}, "--json", {out!r}])
    """,
    "bench_container": """
        from benchmarks import bench_container as bench
        bench.host_cold_start = lambda tag, timeout_s: 1.0
        bench.ContainerTarget.start = lambda self: ("url", 1.5)
        bench.ContainerTarget.stop = lambda self: None
        bench.ContainerTarget.size_bytes = lambda self: 10**9
        limit()
        bench.main(["--rounds", "1", "--json", {out!r}])
    """,
}


@pytest.mark.parametrize("benchmark", sorted(JSON_RUNS))
def test_a_json_write_that_fails_leaves_the_previous_file_whole(benchmark, tmp_path, hog_detector_dir):
    """``--json`` was written in place (``Path.write_text``): a write that failed part way (a full disk, a
    quota, Ctrl-C) left a truncated JSON where the previous run's result had been."""
    out = tmp_path / "result.json"
    out.write_text('{"previous": 1}\n')
    code = textwrap.dedent("""
        import os, resource, signal, sys
        sys.path.insert(0, {repo!r})
        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
    """).format(repo=str(REPO)) + textwrap.dedent(JSON_RUNS[benchmark]).format(
        repo=str(REPO), tmp=str(tmp_path), out=str(out), detector=str(hog_detector_dir))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert run.returncode != 0 and "File too large" in run.stderr, run.stdout + run.stderr
    assert out.read_text() == '{"previous": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


class _Locator:
    """A ``FaceLocator`` stand-in that logs which side each timed detection ran on (``key(kwargs)``) and finds
    no face (so ``bench_cnn_retry`` times every round too)."""

    max_pixels = 40_000_000

    def __init__(self, log: list, side=None):
        self.log, self.side = log, side

    def detect(self, image, parallel: bool = False):
        self.log.append(self.side if self.side is not None else parallel)
        return []


def _photos(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 40, 90, 160)).save(folder / f"{i}.png")
    return sorted(folder.iterdir())


def _first_sides(log: list, photos: int, rounds: int, untimed: int) -> list:
    """Per (photo, round), the side timed first: each photo logs ``untimed`` calls, then a pair per round."""
    per_photo = untimed + 2 * rounds
    return [log[p * per_photo + untimed + 2 * r] for p in range(photos) for r in range(rounds)]


@pytest.mark.parametrize("benchmark", ["bench_detect", "bench_cnn_retry"])
def test_detection_benchmarks_put_each_side_first_equally_often(benchmark, tmp_path):
    """The order alternated by round alone: with the default ``--rounds 3`` every photo timed one side first
    twice and the other once, always the same side; rotating by photo too evens it out over the photos."""
    import importlib

    bench = importlib.import_module(f"benchmarks.{benchmark}")
    photos, rounds, log = _photos(tmp_path / "photos", 4), 3, []
    if benchmark == "bench_detect":  # per photo, untimed: one thread, two threads (faces compared)
        bench.measure(_Locator(log), photos, rounds)
    else:  # per photo, untimed: without and with the look (faces counted)
        bench.measure(_Locator(log, "without"), _Locator(log, "with"), photos, rounds)
    firsts = _first_sides(log, len(photos), rounds, untimed=2)
    counts = {side: firsts.count(side) for side in set(log)}
    assert len(counts) == 2 and len(set(counts.values())) == 1, f"first in a round: {counts}"


def test_external_crops_benchmark_reads_the_repos_params_from_any_folder(tmp_path):
    """Its --params default was "params.yaml" in the current folder, while the sets it names resolve against the
    repo: run from anywhere else it stopped with "--params params.yaml is not a file" before any work."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_external_crops.py"
    done = subprocess.run([sys.executable, str(script), "--detector", str(tmp_path / "no-detector")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "is not a file" not in done.stderr
    # Past the params, the next check speaks: the sets' (read from the repo's params.yaml), which stops a run without
    # ../shared before the detector is fetched (round 30), or, beside ../shared, the detector's.
    sets_checked = "evaluate.external: '../shared/datasets/utk-external' not found" in done.stderr
    assert sets_checked or f"--detector {tmp_path / 'no-detector'}" in done.stderr, done.stderr
