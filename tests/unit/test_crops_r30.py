"""Round 30 review of the crop path (preprocess, faces, chips): a full disk while the crops are written, the
release-crop fallback of NFD-named photos, and errors from a crop worker that named no photo."""

import errno
import os
import unicodedata

import numpy as np
import pytest
from PIL import Image

import faceage.preprocess as preprocess
from faceage.appa_real import COLUMNS, SPLITS, Sample, WriteError, fetch_appa_real
from faceage.config import PreprocessParams
from faceage.errors import FaceAgeError

# 16 px noise has no face: the whole_image fallback crops every photo, no detector look is slow.
PARAMS = PreprocessParams(workers=1, cnn_retry_side=0, no_face="whole_image", size=32)


def make_release(root):
    """A release of two 16x16 noise photos per split, fetched into ``root / "raw"`` (with its dataset.json)."""
    rng = np.random.default_rng(0)
    src = root / "src"
    for split in SPLITS:
        (src / split).mkdir(parents=True)
        lines = [",".join(COLUMNS)]
        for i in range(2):
            name = f"{split}{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(src / split / name)
            lines.append(f"{name},10,30,1,30")
        (src / f"gt_avg_{split}.csv").write_text("\n".join(lines) + "\n")
    fetch_appa_real(str(src), root / "raw")
    return root / "raw"


def hidden_beside(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}-"))


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fill_the_disk_at_save(monkeypatch, after: int):
    """PIL's save raises ENOSPC (naming the file, as the kernel's error does) once ``after`` crops are written."""
    save, calls = Image.Image.save, []

    def save_until_full(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_full)


# 1. A full disk while preprocess writes its crops ---------------------------------------------------------------

def test_a_full_disk_while_writing_the_crops_is_one_line_and_keeps_the_previous_output(tmp_path, detector_dir,
                                                                                      monkeypatch):
    """ENOSPC surfaced as a raw OSError traceback from PIL's save. It is one FaceAgeError line naming the output
    folder and the space free, the partial crops are gone and the previous output stands as it was."""
    data, out = make_release(tmp_path), tmp_path / "data" / "faces"
    preprocess.preprocess_dataset(data, detector_dir, out, PARAMS)
    before = snapshot(out)
    fill_the_disk_at_save(monkeypatch, after=3)
    with pytest.raises(FaceAgeError) as e:
        preprocess.preprocess_dataset(data, detector_dir, out, PARAMS)
    message = str(e.value)
    assert isinstance(e.value, WriteError) and isinstance(e.value, OSError) and "\n" not in message
    assert message.startswith(f"writing the crops of {data} into {out} failed: [Errno 28] No space left on device")
    assert "(at valid/valid1.png)" in message  # the 4th crop, named by its place in the output
    assert f"MB is free in {out.parent}" in message
    assert snapshot(out) == before and hidden_beside(out) == []
    monkeypatch.undo()
    assert preprocess.preprocess_dataset(data, detector_dir, out, PARAMS)["total"]["whole_image"] == 6


def test_a_full_disk_on_a_first_run_leaves_no_output_a_rerun_would_take_as_complete(tmp_path, detector_dir,
                                                                                    monkeypatch):
    """From a worker process (the error comes back pickled, errno and file name kept) on a first run."""
    data, out = make_release(tmp_path), tmp_path / "faces"

    def full_disk_in_a_worker(fn, items, workers, initializer, initargs, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(initargs[2]) + "/test/test0.png")

    monkeypatch.setattr(preprocess, "map_in_processes", full_disk_in_a_worker)
    with pytest.raises(WriteError, match=r"into .*faces failed: \[Errno 28\] No space left on device "
                                         r"\(at test/test0.png\); [\d,.]+ MB is free in "):
        preprocess.preprocess_dataset(data, detector_dir, out, PreprocessParams(workers=2, cnn_retry_side=0))
    assert not out.exists() and hidden_beside(out) == []


def test_an_error_other_than_a_full_disk_is_not_dressed_as_one(tmp_path, detector_dir, monkeypatch):
    data, out = make_release(tmp_path), tmp_path / "faces"
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(fp))))
    with pytest.raises(PermissionError) as e:
        preprocess.preprocess_dataset(data, detector_dir, out, PARAMS)
    assert not isinstance(e.value, FaceAgeError) and not out.exists() and hidden_beside(out) == []


# 2. The release-crop fallback of a photo named in NFD -----------------------------------------------------------

def test_a_photo_named_in_nfd_gets_its_release_crop_when_no_face_is_found(tmp_path, detector_dir):
    """A Mac writes accented names decomposed (NFD); the CSV holds them composed (NFC). The photo was found by its
    NFC form (listed_file), its NAME_face.jpg was looked up by the CSV's spelling only: not found, so a photo
    with a release crop fell to no_face and was skipped (an external set in the release layout, read in place)."""
    name = "José.png"
    assert unicodedata.normalize("NFC", name) == name
    split = tmp_path / "set" / "test"
    split.mkdir(parents=True)
    nfd = unicodedata.normalize("NFD", name)
    y, x = np.mgrid[0:120, 0:160]
    Image.fromarray(np.stack([x, y, x + y], axis=2).astype(np.uint8)).save(split / nfd)  # no face
    Image.fromarray(np.full((90, 70, 3), 128, np.uint8)).save(split / (nfd + "_face.jpg"))
    out = tmp_path / "faces"
    out.mkdir()
    params = PreprocessParams(workers=1, retry_pad=0.0, cnn_retry_side=0, no_face="release_crop", size=32)
    [row] = preprocess.crop_samples({"test": [Sample("test", name, 30.0, 0.0, 30.0)]}, tmp_path / "set",
                                    detector_dir, out, params)
    assert (row["status"], row["crop"]) == ("release_crop", "test/José.png")
    assert np.asarray(Image.open(out / row["crop"])).shape == (32, 32, 3)


# 3. An error in a crop worker names the photo -------------------------------------------------------------------

_real_process = preprocess._process


def _decoder_that_breaks(path, **kwargs):
    raise RuntimeError("an unexpected error inside the decoder")


def _process_with_a_broken_decoder(task):
    """``_process`` in a worker whose decoder raises what it never should (dlib or a Pillow plugin on an odd
    photo): set up here, in the worker process itself."""
    preprocess.load_image = _decoder_that_breaks
    return _real_process(task)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unexpected_error_while_cropping_names_the_photo(tmp_path, detector_dir, monkeypatch, workers):
    """The traceback of an error raised while cropping (in this process or a worker's) named no photo: among
    thousands, the user could not tell which one to look at or take out."""
    data = make_release(tmp_path)
    out = tmp_path / "faces"
    out.mkdir()
    sample = Sample("valid", "valid1.jpg", 30.0, 1.0, 30.0)
    if workers == 1:
        monkeypatch.setattr(preprocess, "load_image", _decoder_that_breaks)
    else:
        monkeypatch.setattr(preprocess, "_process", _process_with_a_broken_decoder)
    with pytest.raises(RuntimeError, match="unexpected error inside the decoder") as e:
        preprocess.crop_samples({"valid": [sample]}, data, detector_dir, out,
                                PreprocessParams(workers=workers, cnn_retry_side=0))
    assert any(f"while cropping valid/valid1.jpg ({data / 'valid' / 'valid1.jpg'})" in note
               for note in getattr(e.value, "__notes__", [])), getattr(e.value, "__notes__", None)

