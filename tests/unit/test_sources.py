"""Fingerprints of the data outside the repo (``check_sources``), and relative sources in DVC temp runs."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from faceage.appa_real import LayoutError, fetch_appa_real
from faceage.download import file_digest
from faceage.sources import (ExternalSetError, PretrainedMissingError, external_fingerprint, pretrained_fingerprint,
                             refresh, source_fingerprint)
from tests.unit.test_appa_real import make_release, zip_release

REPO = Path(__file__).resolve().parents[2]


def edit_label(folder: Path, split: str = "test") -> None:
    labels = folder / f"gt_avg_{split}.csv"
    labels.write_text(labels.read_text().replace("20.5", "50.5", 1))


def test_a_folder_is_known_by_its_bytes_not_its_path_or_times(tmp_path):
    src = make_release(tmp_path / "src")
    first = source_fingerprint(str(src))
    assert first["kind"] == "folder" and first["files"] == 2 * 9 + 3 and len(first["sha256"]) == 64
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)  # new inodes and times, the same bytes
    os.utime(copy / "test" / "test000.jpg", (1, 1))
    assert source_fingerprint(str(copy))["sha256"] == first["sha256"]

    edit_label(src)  # a relabelled face
    relabelled = source_fingerprint(str(src))
    assert relabelled["sha256"] != first["sha256"] and relabelled["files"] == first["files"]
    shutil.copyfile(src / "test" / "test000.jpg", src / "test" / "extra.jpg")  # an added image
    added = source_fingerprint(str(src))
    assert added["files"] == first["files"] + 1 and added["sha256"] not in (first["sha256"], relabelled["sha256"])


def test_a_zip_is_its_sha256_and_a_url_is_pinned_by_its_md5_without_a_request(tmp_path):
    archive = zip_release(make_release(tmp_path / "appa-real-release"), tmp_path / "release.zip")
    record = source_fingerprint(str(archive), "")
    assert record["kind"] == "file" and record["sha256"] == file_digest(archive)
    assert record["bytes"] == archive.stat().st_size
    # Port 9 on 127.0.0.1 (discard) has no server here: any request would fail.
    url = source_fingerprint("http://127.0.0.1:9/appa-real-release.zip", "abc")
    assert url == {"source": "http://127.0.0.1:9/appa-real-release.zip", "md5": "abc", "kind": "url"}


def test_a_relative_source_is_read_from_the_repo_root_also_in_a_dvc_temp_run(tmp_path, monkeypatch):
    project = tmp_path / "project"
    make_release(project / "datasets" / "mine")
    temp_run = project / ".dvc" / "tmp" / "exps" / "standalone" / "tmpk2x9"
    temp_run.mkdir(parents=True)
    monkeypatch.chdir(temp_run)  # where `dvc exp run --temp` runs each stage
    assert source_fingerprint("datasets/mine")["sha256"] == source_fingerprint(str(project / "datasets" / "mine"))["sha256"]
    info = fetch_appa_real("datasets/mine", temp_run / "data" / "raw")
    assert info["counts"] == {"train": 3, "valid": 3, "test": 3}
    [ext] = external_fingerprint(["datasets/mine"])["sets"]
    assert ext["name"] == "mine" and ext["source"] == "datasets/mine"
    with pytest.raises(LayoutError, match=r"'nowhere' does not exist \(resolved to .*project/nowhere"):
        source_fingerprint("nowhere")
    with pytest.raises(ExternalSetError, match="'nowhere' not found"):
        external_fingerprint(["nowhere"])


def test_refresh_rewrites_only_a_changed_record(tmp_path):
    src = make_release(tmp_path / "src")
    out = tmp_path / "data" / "source.json"
    given = {"source": str(src), "md5": ""}
    record = refresh(out, lambda: source_fingerprint(str(src)), given)
    assert json.loads(out.read_text()) == record
    os.utime(out, (1, 1))
    refresh(out, lambda: source_fingerprint(str(src)), given)
    assert out.stat().st_mtime == 1, "unchanged: not rewritten"
    edit_label(src)
    assert refresh(out, lambda: source_fingerprint(str(src)), given)["sha256"] != record["sha256"]
    assert json.loads(out.read_text())["sha256"] != record["sha256"]


def test_a_source_missing_here_keeps_the_fingerprint_recorded_for_the_same_params(tmp_path, caplog):
    """A teammate who pulled the outputs from a DVC remote has no copy of the raw folder."""
    src = make_release(tmp_path / "src")
    out = tmp_path / "source.json"
    given = {"source": str(src), "md5": ""}
    record = refresh(out, lambda: source_fingerprint(str(src)), given)
    shutil.rmtree(src)
    with caplog.at_level(logging.WARNING, logger="faceage.sources"):
        assert refresh(out, lambda: source_fingerprint(str(src)), given) == record
    assert "keeping the fingerprint recorded" in caplog.text
    with pytest.raises(LayoutError, match="does not exist"):  # another source: nothing recorded for it
        refresh(out, lambda: source_fingerprint(str(src)), {**given, "md5": "abc"})
    with pytest.raises(LayoutError, match="does not exist"):  # no record at all
        refresh(tmp_path / "none.json", lambda: source_fingerprint(str(src)), given)


def test_a_record_cut_short_with_the_source_missing_is_named_as_a_missing_source(tmp_path):
    """A killed write left half a record: with the source gone too, the stage said JSONDecodeError."""
    src = make_release(tmp_path / "src")
    out = tmp_path / "source.json"
    given = {"source": str(src), "md5": ""}
    record = refresh(out, lambda: source_fingerprint(str(src)), given)
    out.write_text(json.dumps(record)[:25])  # what a write killed half-way leaves
    shutil.rmtree(src)
    with pytest.raises(LayoutError, match="does not exist"):
        refresh(out, lambda: source_fingerprint(str(src)), given)
    out.write_text("[1, 2]")  # JSON, but not a record
    with pytest.raises(LayoutError, match="does not exist"):
        refresh(out, lambda: source_fingerprint(str(src)), given)


def test_a_record_is_written_whole_or_not_at_all(tmp_path):
    src = make_release(tmp_path / "src")
    out = tmp_path / "source.json"
    record = refresh(out, lambda: source_fingerprint(str(src)), {"source": str(src), "md5": ""})
    assert json.loads(out.read_text()) == record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.json", "src"]  # no temporary file left


def test_the_stage_writes_both_records_and_names_a_missing_external_set(tmp_path):
    src = make_release(tmp_path / "src")
    ext = make_release(tmp_path / "ext")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["fetch_data"].update(source=str(src), md5="")
    params["evaluate"]["external"] = [str(ext)]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, str(REPO / "stages" / "check_sources.py"), "--params", "params.yaml",
           "--source", "out/source.json", "--external", "out/external.json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "source.json").read_text())["kind"] == "folder"
    [record] = json.loads((tmp_path / "out" / "external.json").read_text())["sets"]
    assert record["name"] == "ext" and len(record["sha256"]) == 64

    params["evaluate"]["external"] = [str(tmp_path / "gone")]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert re.search(r"ExternalSet\w*Error: evaluate.external:", done.stderr) and "gone" in done.stderr


def test_a_set_that_is_here_but_broken_fails_instead_of_keeping_its_old_fingerprint(tmp_path):
    """The record was kept for any layout error, so an edit that broke a set (a row for a missing
    image) left evaluate's results from the old data standing, with a warning saying the set was not here."""
    ext = make_release(tmp_path / "ext")
    out = tmp_path / "external.json"
    given = {"sources": [str(ext)]}
    record = refresh(out, lambda: external_fingerprint([str(ext)]), given)
    edit_label(ext)
    (ext / "test" / "test002.jpg").unlink()
    with pytest.raises(ExternalSetError, match=r"1 of 3 images listed in gt_avg_test.csv are missing"):
        refresh(out, lambda: external_fingerprint([str(ext)]), given)
    assert json.loads(out.read_text()) == record
    shutil.rmtree(ext)  # gone from this machine: the recorded fingerprint stands, as before
    assert refresh(out, lambda: external_fingerprint([str(ext)]), given) == record


def test_new_bytes_in_a_weights_file_change_trains_fingerprint(tmp_path):
    """DVC saw only train.pretrained's path: weights replaced at the same path left the model trained on
    the old ones ("Stage 'train' didn't change")."""
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"old weights")
    out, given = tmp_path / "data" / "pretrained.json", {"pretrained": str(weights)}
    first = refresh(out, lambda: pretrained_fingerprint(str(weights)), given)
    assert first["kind"] == "file" and first["sha256"] == file_digest(weights)
    assert refresh(out, lambda: pretrained_fingerprint(str(weights)), given) == first  # unchanged: same record
    weights.write_bytes(b"new weights")
    second = refresh(out, lambda: pretrained_fingerprint(str(weights)), given)
    assert second["sha256"] != first["sha256"] and json.loads(out.read_text()) == second
    assert pretrained_fingerprint("imagenet") == {"pretrained": "imagenet", "kind": "imagenet"}
    assert pretrained_fingerprint("none") == {"pretrained": "none", "kind": "none"}


def test_a_missing_weights_file_names_the_param_unless_a_record_stands_for_it(tmp_path):
    out, gone = tmp_path / "pretrained.json", str(tmp_path / "gone.pth")
    with pytest.raises(PretrainedMissingError, match=r"train.pretrained='.*gone.pth': no such weights file"):
        refresh(out, lambda: pretrained_fingerprint(gone), {"pretrained": gone})
    record = {"pretrained": gone, "kind": "file", "bytes": 3, "sha256": "ab" * 32}  # a teammate's `dvc pull`
    out.write_text(json.dumps(record))
    assert refresh(out, lambda: pretrained_fingerprint(gone), {"pretrained": gone}) == record


def test_train_depends_on_the_weights_fingerprint():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "train.pretrained" in stages["check_sources"]["params"]
    assert any("data/pretrained.json" in out for out in stages["check_sources"]["outs"])
    assert "data/pretrained.json" in stages["train"]["deps"]


def test_dlib_networks_read_no_weights_file_so_none_is_fingerprinted():
    """dlib_age takes any value but none as dlib's weights: check_sources stopped the pipeline on
    train.pretrained=dlib ("no such weights file"), and fingerprinted a file it never reads."""
    from faceage.chips import DLIB_AGE
    from faceage.face_encoder import FACE_ENCODER
    from faceage.sources import DLIB_BACKBONES

    assert set(DLIB_BACKBONES) == {DLIB_AGE, FACE_ENCODER}
    assert pretrained_fingerprint("dlib", DLIB_AGE) == {"pretrained": "dlib", "kind": "dlib"}
    with pytest.raises(PretrainedMissingError):
        pretrained_fingerprint("dlib", "resnet18")
