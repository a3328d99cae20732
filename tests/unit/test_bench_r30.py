"""Round 30's review of the benchmarks: a run that measures nothing (no decodable photo, no external set, no
request sent) says so and exits non-zero instead of printing empty figures and exiting 0; a missing input (the
``wild`` photos, an ``evaluate.external`` folder, a later ``--tag``) is one message before the minutes of work
it used to come after. Stand-ins only: no bento, no model, no shared data."""

import importlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import http_server
from tests.unit.test_bench_server import Answering

REPO = Path(__file__).resolve().parents[2]

# The benchmarks' main() turn SIGTERM into SystemExit (_server.exit_on_sigterm): put back for pytest.
pytestmark = pytest.mark.usefixtures("sigterm_restored")


def went_on(*args, **kwargs):
    raise AssertionError("the benchmark went on to work it should not have started")


def broken_photos(folder: Path) -> Path:
    """A folder whose only photo does not decode (and a labels.csv, which the benchmarks skip)."""
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "labels.csv").write_text("file,n_faces\nbroken.jpg,1\n")
    return folder


def test_detection_benchmark_without_a_decodable_photo_says_so_and_fails(tmp_path, monkeypatch, capsys):
    """0 decodable photos printed '0 photos on N cores, the same faces both ways' and exited 0."""
    import benchmarks.bench_detect as bench

    monkeypatch.setattr(bench, "FaceLocator", lambda *a, **k: SimpleNamespace(max_pixels=10**8, detect=went_on))
    photos = broken_photos(tmp_path / "photos")
    out = tmp_path / "out.json"
    rc = bench.main(["--photos", str(photos), "--detector", str(tmp_path), "--json", str(out)])
    assert rc != 0
    assert f"no decodable photo in {photos}: nothing was measured" in capsys.readouterr().err


def test_cnn_look_benchmark_with_a_folder_without_a_decodable_photo_says_so_and_fails(tmp_path, monkeypatch, capsys):
    """A folder with no decodable photo gave '0 photos' and exit 0, beside a folder that was measured."""
    import benchmarks.bench_cnn_retry as bench

    rows = [{"photo": "a.jpg", "width": 10, "height": 10, "faces": 1, "faces_with_look": 1, "ms": 1.0,
             "ms_with_look": 1.0}]
    full = tmp_path / "full"
    full.mkdir()
    (full / "a.jpg").write_bytes(b"x")
    empty = broken_photos(tmp_path / "empty")
    monkeypatch.setattr(bench, "FaceLocator", lambda *a, **k: None)
    monkeypatch.setattr(bench, "measure", lambda without, with_look, photos, rounds: rows if full in
                        {p.parent for p in photos} else [])
    rc = bench.main(["--photos", str(full), str(empty), "--detector", str(tmp_path)])
    assert rc != 0
    err = capsys.readouterr().err
    assert f"no decodable photo in {empty}: nothing was measured" in err and str(full) not in err


def _params_with_external(tmp_path: Path, external: list[str]) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["external"] = external
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize("external", [[], ["nowhere"]], ids=["no set", "a missing set"])
def test_external_crops_benchmark_without_a_set_to_crop_says_so_before_the_detector(
        external, tmp_path, monkeypatch, capsys):
    """``evaluate.external: []`` printed ``"sets": {}`` and exited 0 (it measured nothing); a set whose folder is
    missing (no ``../shared``) ended in an ExternalSetMissingError traceback, after the detector was fetched."""
    import benchmarks.bench_external_crops as bench

    monkeypatch.setattr(bench, "fetch_detector_files", went_on)
    monkeypatch.setattr(bench, "external_faces", went_on)
    params = _params_with_external(tmp_path, [str(tmp_path / e) for e in external])
    with pytest.raises(SystemExit) as e:
        bench.main(["--params", str(params)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ("nothing to measure" in err) if not external else (str(tmp_path / "nowhere") in err)


def test_the_external_set_of_a_missing_folder_is_one_message(tmp_path):
    """``_paths.external_set`` (``dlib_age_heads``, ``dlib_age_sweep``, ``shift_groups``): without ``../shared``
    an ExternalSetMissingError traceback, not the one message its docstring promises."""
    from benchmarks._paths import external_set

    _params_with_external(tmp_path, [str(tmp_path / "utk_external")])
    with pytest.raises(SystemExit) as e:
        external_set("utk_external", tmp_path)
    assert str(tmp_path / "utk_external") in str(e.value.code)


def test_load_test_that_sent_no_request_fails_a_check(tmp_path, monkeypatch, capsys):
    """``--requests 0`` against a healthy service: every check 'ok' and exit 0, having measured nothing."""
    import benchmarks.load_test as load_test

    monkeypatch.setattr(load_test, "server_pid", lambda url: os.getpid())  # some RSS to measure: steady
    with http_server(Answering) as srv:
        rc = load_test.main(["--url", f"http://127.0.0.1:{srv.server_address[1]}", "--requests", "0",
                             "--clients", "1"])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "[FAILED] at least one request answered" in printed


def test_heads_benchmark_without_the_wild_photos_says_so_before_computing_descriptors(tmp_path, monkeypatch):
    """No ``wild`` folder (no ``../shared``): ``load_inputs`` computed the descriptors of every labelled split
    (minutes) and then ended in a FileNotFoundError traceback on ``wild/labels.csv``."""
    import benchmarks.dlib_age_heads as heads

    monkeypatch.setattr(heads, "WILD", tmp_path / "wild")
    monkeypatch.setattr(heads, "cache_dir", lambda detector=None, **k: tmp_path / "cache")
    monkeypatch.setattr(heads, "_labelled_sources", went_on)
    monkeypatch.setattr("faceage.face_encoder.DlibFaceEncoder", lambda *a, **k: None)
    monkeypatch.setattr("faceage.face_net.load_face_net", lambda *a, **k: None)
    for compute in (heads.load_inputs, heads.face_layers):
        with pytest.raises(SystemExit) as e:
            compute(tmp_path)
        assert f"{tmp_path / 'wild' / 'labels.csv'}" in str(e.value.code)


def test_service_benchmark_checks_every_tag_before_measuring_the_first(monkeypatch, capsys):
    """A later ``--tag`` that is not there stopped the run only after the first bento was measured (minutes)."""
    import bentoml

    import benchmarks.bench_service as bs
    import faceage.predict

    def get(tag):
        if tag != "face_age:there":
            raise bentoml.exceptions.NotFound(f"Bento {tag!r} is not found")
        return SimpleNamespace(tag=tag, info=SimpleNamespace(all_models=[SimpleNamespace(tag="face-age:m")]))

    monkeypatch.setattr(bentoml, "get", get)
    models = importlib.import_module("bentoml.models")  # (bentoml.models is a lazy loader in front of it)
    monkeypatch.setattr(models, "get", lambda tag: SimpleNamespace(path="/nowhere", tag=tag))
    monkeypatch.setattr(faceage.predict.AgePredictor, "from_model_dir", lambda *a, **k: object())
    monkeypatch.setattr(bs, "measure", went_on)
    with pytest.raises(SystemExit) as e:
        bs.main(["--tag", "face_age:there", "--tag", "face_age:missing", "--photos",
                 str(REPO / "faceage" / "examples")])
    assert "face_age:missing" in str(e.value.code)
