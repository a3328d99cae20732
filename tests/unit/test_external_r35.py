"""Round 35 review of the external-set cache (faceage/external.py).

1. A set's ``dlib_face`` descriptors were cached in one file per crop entry (``embeddings.npz``), rewritten whenever
   the code or face-network files that compute them differed: two evaluations of one set at the same moment with
   different descriptor code (two worktrees sharing the crop cache, ``dvc exp run --queue`` with jobs) swapped the
   file under each other, and the run that had been handed the path read the other run's descriptors (the path is
   read after the entry's lock is let go). The descriptors are now kept under a name keyed by their code and files:
   a run only ever reads the file of its own key.
2. A resumed crop of an external set logged only preprocess's "resuming preprocess from ...": it now says which
   external set is being cropped (and its "cropping" line no longer names preprocess.workers).
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import numpy as np
import pytest

import faceage.external as external
from faceage.external import external_embeddings, external_faces
from faceage.sources import resolve_external
from tests.unit.test_external import checkpoint_crop, make_set


@pytest.fixture
def astronaut_set(tmp_path):
    """A one-face set (the astronaut) and its resolved ExternalSet."""
    from skimage.data import astronaut

    folder = make_set(tmp_path / "astro-set", {"astronaut.jpg": astronaut()}, {"astronaut.jpg": 53.0})
    [ext] = resolve_external([str(folder)], tmp_path)
    return ext


def _descriptors(path):
    with np.load(path) as z:
        return z["embeddings"].copy()


def _edit_descriptor_code(tmp_path, monkeypatch):
    """Another worktree's descriptor code: faceage/face_encoder.py edited (its fingerprint changes) to compute
    descriptors half as large."""
    import faceage.face_encoder as face_encoder

    edited = tmp_path / "edited" / os.path.basename(face_encoder.__file__)
    edited.parent.mkdir(exist_ok=True)
    shutil.copyfile(face_encoder.__file__, edited)
    with open(edited, "a") as f:
        f.write("\n# edited in another worktree\n")
    monkeypatch.setattr(face_encoder, "__file__", str(edited))
    embed_views = face_encoder.DlibFaceEncoder.embed_views
    monkeypatch.setattr(face_encoder.DlibFaceEncoder, "embed_views", lambda self, crop: embed_views(self, crop) / 2)


# 1. Each key reads its own descriptors ------------------------------------------------------------------------

def test_a_run_reads_its_own_descriptors_after_another_key_computed_theirs(astronaut_set, detector_dir, tmp_path,
                                                                           monkeypatch):
    """Run A gets its path; run B (other descriptor code) computes its descriptors in the same entry before A reads
    the path (as evaluate does, after the lock is let go): A reads A's descriptors, not B's; B reads B's."""
    faces = external_faces(astronaut_set, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=1)
    path_a = external_embeddings(faces, detector_dir, workers=1)
    own = _descriptors(path_a)
    assert own.shape == (1, 2, 128)

    with monkeypatch.context() as m:  # run B, in another worktree, at the same moment
        _edit_descriptor_code(tmp_path, m)
        path_b = external_embeddings(faces, detector_dir, workers=1)
        np.testing.assert_allclose(_descriptors(path_b), own / 2, rtol=1e-6)

    np.testing.assert_array_equal(_descriptors(path_a), own)  # A reads its path now: still A's descriptors
    assert path_b != path_a and path_a.parent == path_b.parent == faces
    # A again: its own file, reused as it is (not computed again over B's)
    stamp = os.stat(path_a).st_mtime_ns
    assert external_embeddings(faces, detector_dir, workers=1) == path_a
    assert os.stat(path_a).st_mtime_ns >= stamp
    np.testing.assert_array_equal(_descriptors(path_a), own)
    np.testing.assert_allclose(_descriptors(path_b), own / 2, rtol=1e-6)


def test_the_descriptor_file_is_keyed_by_code_and_network_files():
    """The key changes with the code's fingerprint and with either face-network file's sha256, and nothing else."""
    key = external.descriptors_key("code", "encoder", "shape")
    assert key == external.descriptors_key("code", "encoder", "shape")
    assert len({key, external.descriptors_key("code2", "encoder", "shape"),
                external.descriptors_key("code", "encoder2", "shape"),
                external.descriptors_key("code", "encoder", "shape2")}) == 4


def test_old_descriptor_files_are_removed_but_not_recent_ones(astronaut_set, detector_dir, tmp_path):
    """Descriptors of other keys do not pile up in an entry: those not used for IN_USE_S beyond the most recent
    KEEP_ENTRIES go (and the single file of older versions, with its record) when a new key is computed; a file
    used recently stays, whatever the count (another run may be about to read it)."""
    faces = external_faces(astronaut_set, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=1)
    old = time.time() - external.IN_USE_S - 60
    legacy = faces / external.EMBEDDINGS
    legacy.write_bytes(b"descriptors of an older version")
    (faces / external.DESCRIPTOR_RECORD).write_text("{}")
    stale = [faces / f"embeddings-{i:016x}.npz" for i in range(external.KEEP_ENTRIES + 2)]
    for i, path in enumerate(stale):
        path.write_bytes(b"x")
        os.utime(path, (old - i, old - i))
    os.utime(legacy, (old - 100, old - 100))
    recent = faces / f"embeddings-{'f' * 16}.npz"
    recent.write_bytes(b"x")
    mine = external_embeddings(faces, detector_dir, workers=1)
    names = {p.name for p in faces.iterdir() if p.name.startswith("embeddings")}
    # kept: the new one, the recent one, and the most recently used of the old up to KEEP_ENTRIES in all
    assert mine.name in names and recent.name in names
    assert names == {mine.name, recent.name} | {p.name for p in stale[:external.KEEP_ENTRIES - 2]}
    assert not legacy.exists() and not (faces / external.DESCRIPTOR_RECORD).exists()


# 2. A resumed crop names the external set -------------------------------------------------------------------

def test_a_resumed_crop_names_the_external_set(astronaut_set, detector_dir, tmp_path, monkeypatch, caplog):
    """A crop stopped half-way (Ctrl-C) and run again logs that external set NAME resumes from the stopped run's
    work (it said "resuming preprocess"), and its cropping line names the set, not preprocess.workers."""
    crop_samples = external.crop_samples

    def stopped(*args, **kwargs):
        crop_samples(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(external, "crop_samples", stopped)
    with pytest.raises(KeyboardInterrupt):
        external_faces(astronaut_set, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=1)
    monkeypatch.setattr(external, "crop_samples", crop_samples)
    with caplog.at_level(logging.INFO):
        external_faces(astronaut_set, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=1)
    resumed = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert resumed and all(m.startswith(f"resuming external set {astronaut_set.name} from ") for m in resumed), resumed
    cropping = [r.getMessage() for r in caplog.records if " images with " in r.getMessage()]
    assert cropping and all(m.startswith(f"external set {astronaut_set.name}: cropping ") for m in cropping), cropping
    assert not [m for m in cropping if "preprocess.workers" in m]  # evaluate's own worker count, not preprocess's


def test_a_fresh_crop_does_not_claim_to_resume(astronaut_set, detector_dir, tmp_path, caplog):
    """No partial folder: nothing is said of resuming."""
    with caplog.at_level(logging.INFO):
        external_faces(astronaut_set, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=1)
    assert not [r for r in caplog.records if "resuming" in r.getMessage() or "starting over" in r.getMessage()]




def test_a_recently_used_file_of_another_key_stays_whatever_the_count(astronaut_set, detector_dir, tmp_path,
                                                                       monkeypatch):
    """With room for one file only, another key's file used minutes ago is kept (its run may not have read it yet);
    one not used for IN_USE_S goes."""
    monkeypatch.setattr(external, "KEEP_ENTRIES", 1)
    faces = external_faces(astronaut_set, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=1)
    recent, old = faces / f"embeddings-{'a' * 16}.npz", faces / f"embeddings-{'b' * 16}.npz"
    recent.write_bytes(b"x")
    old.write_bytes(b"x")
    os.utime(old, (time.time() - external.IN_USE_S - 1,) * 2)
    mine = external_embeddings(faces, detector_dir, workers=1)
    assert sorted(p.name for p in faces.iterdir() if p.name.startswith("embeddings")) == sorted([mine.name,
                                                                                               recent.name])


def test_a_garbled_descriptor_file_is_computed_again(astronaut_set, detector_dir, tmp_path, caplog):
    """A file of this key that cannot be read (a disk error, a hand edit) is computed again, with a warning."""
    faces = external_faces(astronaut_set, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=1)
    path = external_embeddings(faces, detector_dir, workers=1)
    own = _descriptors(path)
    path.write_bytes(b"PK\x03\x04 garbled")
    with caplog.at_level(logging.WARNING, logger="faceage.external"):
        assert external_embeddings(faces, detector_dir, workers=1) == path
    np.testing.assert_array_equal(_descriptors(path), own)
    assert any("cannot be read" in r.getMessage() for r in caplog.records)


def test_staging_files_of_killed_descriptor_runs_are_removed(astronaut_set, detector_dir, tmp_path):
    """A run killed (kill -9) while writing descriptors leaves its staging file in the shared entry; no run writes one
    without the entry's lock, so the next run that computes descriptors (holding it) removes them."""
    faces = external_faces(astronaut_set, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=1)
    killed = [faces / f"embeddings-{'c' * 16}.npz.tmp.npz", faces / "embeddings.npz.tmp.npz"]
    for path in killed:
        path.write_bytes(b"PK\x03\x04 half-written")
    mine = external_embeddings(faces, detector_dir, workers=1)
    assert [p.name for p in faces.iterdir() if "embeddings" in p.name] == [mine.name]
