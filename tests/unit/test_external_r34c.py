"""Round 34 review of the external-set cache (faceage/external.py): two stale reuses.

1. A set's cached ``dlib_face`` descriptors (``embeddings.npz`` in its crop-cache entry) were reused whenever the
   face-network files' sha256 matched: after an edit of the code that computes them (faceage/face_encoder.py, the
   crop loop and chip geometry in faceage/chips.py, the model loading in faceage/detector.py) ``dvc repro`` reran
   embed, train and evaluate, but evaluate scored the set with the descriptors the old code had computed.
2. The crop-cache key hashed the set's bytes, the crop settings and the crop code, not how the labels are read
   (faceage/appa_real.py's ``read_split``): after an edit of label parsing the entry's ``manifest.csv`` kept the
   ages (and file names) the old parser read. The key now holds the photo list as read (each photo's place and
   labels: what ``job.json`` of preprocess's resume holds), so a parser edit that changes what is read makes a new
   entry, and one that changes nothing reuses the crops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import faceage.external as external
from faceage.external import external_embeddings, external_faces
from faceage.preprocess import code_fingerprint, read_faces_manifest
from faceage.sources import EXTERNAL_SPLIT, resolve_external
from tests.unit.test_external import checkpoint_crop, make_set


@pytest.fixture
def astronaut_set(tmp_path):
    """A one-face set (the astronaut, age 53) and its resolved ExternalSet."""
    from skimage.data import astronaut

    folder = make_set(tmp_path / "set", {"astronaut.jpg": astronaut()}, {"astronaut.jpg": 53.0})
    [ext] = resolve_external([str(folder)], tmp_path)
    return ext


def _descriptors(path):
    with np.load(path) as z:
        return z["embeddings"].copy()


def _edit(module, tmp_path, monkeypatch):
    """An edit of ``module``'s source (a comment added), as ``code_fingerprint`` reads it: its ``__file__`` points at
    the edited copy."""
    edited = tmp_path / "edited" / os.path.basename(module.__file__)
    edited.parent.mkdir(exist_ok=True)
    shutil.copyfile(module.__file__, edited)
    with open(edited, "a") as f:
        f.write("\n# edited\n")
    monkeypatch.setattr(module, "__file__", str(edited))


# 1. The descriptors follow the code that computes them ------------------------------------------------------------

def test_the_descriptor_code_is_what_computes_them():
    """The modules the fingerprint covers: the encoder (alignment + network call), the crop loop and the face box in
    the crop (chips.map_crop_files, chips.face_rect), the dlib model loading (detector.load_dlib_file)."""
    from faceage.external import DESCRIPTOR_CODE_MODULES

    assert {"faceage.face_encoder", "faceage.chips", "faceage.detector"} <= set(DESCRIPTOR_CODE_MODULES)
    # one mechanism: preprocess's fingerprint of the modules it is given, which the crop code's is one use of
    assert code_fingerprint(DESCRIPTOR_CODE_MODULES) != code_fingerprint()
    assert code_fingerprint(DESCRIPTOR_CODE_MODULES) == code_fingerprint(DESCRIPTOR_CODE_MODULES)


@pytest.mark.parametrize("module_name", ["faceage.face_encoder", "faceage.chips"])
def test_descriptors_cut_before_an_edit_of_their_code_are_computed_again(module_name, astronaut_set, detector_dir,
                                                                         tmp_path, monkeypatch):
    """An edit of the descriptor code (here: one that halves every descriptor) gives the new code's descriptors, not
    the cached ones of the old code; the unedited code reuses its own without computing them again."""
    import importlib

    import faceage.face_encoder as face_encoder

    faces = external_faces(astronaut_set, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=1)
    path = external_embeddings(faces, detector_dir, workers=1)
    assert path.parent == faces and path.name.startswith("embeddings-")
    before = _descriptors(path)
    assert before.shape == (1, 2, 128)
    content = path.read_bytes()
    assert external_embeddings(faces, detector_dir, workers=1) == path  # same code: reused as it is
    assert path.read_bytes() == content

    _edit(importlib.import_module(module_name), tmp_path, monkeypatch)
    embed_views = face_encoder.DlibFaceEncoder.embed_views
    monkeypatch.setattr(face_encoder.DlibFaceEncoder, "embed_views", lambda self, crop: embed_views(self, crop) / 2)
    edited = external_embeddings(faces, detector_dir, workers=1)
    assert edited != path and edited.parent == faces  # the edited code's own file; the old one is left as it was
    np.testing.assert_allclose(_descriptors(edited), before / 2, rtol=1e-6)
    np.testing.assert_array_equal(_descriptors(path), before)
    content = edited.read_bytes()
    assert external_embeddings(faces, detector_dir, workers=1) == edited  # the edited code reuses its own
    assert edited.read_bytes() == content


# 2. The crop cache follows the labels as read -------------------------------------------------------------------

def test_a_label_parsing_edit_that_reads_other_labels_is_a_new_entry(astronaut_set, detector_dir, tmp_path,
                                                                      monkeypatch):
    """read_split edited to read other ages (the same CSV bytes): the set's manifest.csv holds the new ages, not
    the ones cached under the old parser."""
    from faceage.appa_real import read_split

    crop = checkpoint_crop(detector_dir)
    faces = external_faces(astronaut_set, crop, detector_dir, tmp_path / "cache", workers=1)
    [row] = read_faces_manifest(faces, EXTERNAL_SPLIT)
    assert row["apparent_age"] == "53.0"

    def edited(root, split):  # e.g. a parser that now reads the real age into apparent_age
        return [dataclasses.replace(s, apparent_age=s.apparent_age + 1.5) for s in read_split(root, split)]

    monkeypatch.setattr(external, "read_split", edited)
    relabelled = external_faces(astronaut_set, crop, detector_dir, tmp_path / "cache", workers=1)
    assert relabelled != faces
    [row] = read_faces_manifest(relabelled, EXTERNAL_SPLIT)
    assert row["apparent_age"] == "54.5"


def test_a_label_parsing_edit_that_reads_the_same_labels_reuses_the_crops(astronaut_set, detector_dir, tmp_path,
                                                                           monkeypatch):
    """An edit of faceage/appa_real.py that reads the same rows (most: it holds the download, unzip and layout code
    too) keeps the entry: no 1,743 faces cropped again."""
    from faceage.appa_real import read_split

    crop = checkpoint_crop(detector_dir)
    faces = external_faces(astronaut_set, crop, detector_dir, tmp_path / "cache", workers=1)
    [row] = read_faces_manifest(faces, EXTERNAL_SPLIT)
    stamp = os.stat(faces / row["crop"]).st_mtime_ns
    monkeypatch.setattr(external, "read_split", lambda root, split: list(read_split(root, split)))
    import faceage.appa_real as appa_real
    _edit(appa_real, tmp_path, monkeypatch)
    assert external_faces(astronaut_set, crop, detector_dir, tmp_path / "cache", workers=1) == faces
    assert os.stat(faces / row["crop"]).st_mtime_ns == stamp


def test_the_cache_key_and_the_resume_job_hash_one_photo_list(astronaut_set, detector_dir, tmp_path):
    """The entry's key and the resume job of its partial folder (job.json) hold the same digest of the photos (place
    and labels): a partial folder named by one key is never resumed for other labels, and the key changes exactly
    when the job's photo list does."""
    from faceage.appa_real import read_split
    from faceage.preprocess import JOB, crop_samples, partial_dir, photos_sha256, resumable_output

    samples = read_split(astronaut_set.path, EXTERNAL_SPLIT)
    crop = checkpoint_crop(detector_dir)
    out = tmp_path / "out"
    # a crop stopped half-way: its partial folder keeps job.json
    with pytest.raises(KeyboardInterrupt):
        with resumable_output(out, [EXTERNAL_SPLIT]) as (tmp, partial):
            crop_samples({EXTERNAL_SPLIT: samples}, astronaut_set.path, detector_dir, tmp,
                         external.crop_params(crop, 1), partial=partial)
            raise KeyboardInterrupt
    job = json.loads((partial_dir(out) / JOB).read_text())
    assert job["photos"]["list_sha256"] == photos_sha256({EXTERNAL_SPLIT: samples}, astronaut_set.path)
    other = [dataclasses.replace(s, real_age=s.real_age + 1) for s in samples]
    assert photos_sha256({EXTERNAL_SPLIT: other}, astronaut_set.path) != job["photos"]["list_sha256"]
    key = external.cache_key(astronaut_set.path, crop, "sp", photos=job["photos"]["list_sha256"])
    assert external.cache_key(astronaut_set.path, crop, "sp") == key  # the rows read by default
    assert external.cache_key(astronaut_set.path, crop, "sp",
                              photos=photos_sha256({EXTERNAL_SPLIT: other}, astronaut_set.path)) != key

