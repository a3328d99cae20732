"""Round 38 review of preprocess as ``dvc repro`` runs it: what its log lines say about the workers it starts, the
photos with more than one face (which one is cropped) and the photos its ``no_face`` policy skips, and which CSV
the error for a photo that kills its crop worker says to edit."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

import faceage.preprocess as preprocess
from faceage.appa_real import COLUMNS, SPLITS, fetch_appa_real
from faceage.chips import WorkerDiedError
from faceage.config import PreprocessParams
from tests.unit.test_crops_r30 import make_release
from tests.unit.test_preprocess_r33 import NOISE, interrupt_at_save

CROPPING = re.compile(r"cropping (\d+) images with (\d+) worker\(s\) \(preprocess\.workers=(\d+)")


def messages(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


def summary(caplog) -> str:
    lines = messages(caplog, "detected a face in ")
    assert len(lines) == 1, lines
    return lines[0]


# 1. The worker count the cropping line states -------------------------------------------------------------------

def test_the_cropping_line_states_the_workers_started_not_the_setting(tmp_path, detector_dir, monkeypatch, caplog):
    """A rerun after an interruption with one photo left said "cropping 1 images with 3 worker(s)": the map starts
    one worker per photo at most (and none for no photo), so the line named processes that never ran."""
    data, out = make_release(tmp_path), tmp_path / "out" / "faces"
    interrupt_at_save(monkeypatch, after=5)  # 5 of the 6 photos done
    with pytest.raises(KeyboardInterrupt):
        preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    monkeypatch.undo()
    caplog.clear()  # the interrupted run's own cropping line, where an earlier test set the level
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    preprocess.preprocess_dataset(data, detector_dir, out, replace(NOISE, workers=3))
    stated = [tuple(map(int, m.groups())) for line in messages(caplog, "cropping ") if (m := CROPPING.search(line))]
    assert stated == [(1, 1, 3)], messages(caplog, "cropping ")
    assert len(preprocess.read_faces_manifest(out)) == 6


# 2. Photos with several faces, and photos the no_face policy skips ---------------------------------------------

def release_of(tmp_path, photos: dict[str, list[tuple[str, object]]]):
    """A fetched release whose splits hold ``(name, source)`` photos: a path to copy, or an array to save."""
    src = tmp_path / "src"
    for split in SPLITS:
        (src / split).mkdir(parents=True)
        lines = [",".join(COLUMNS)]
        for name, source in photos.get(split, []):
            if isinstance(source, np.ndarray):
                Image.fromarray(source).save(src / split / name)
            else:
                shutil.copyfile(source, src / split / name)
            lines.append(f"{name},10,30,1,30")
        (src / f"gt_avg_{split}.csv").write_text("\n".join(lines) + "\n")
    fetch_appa_real(str(src), tmp_path / "raw")
    return tmp_path / "raw"


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)


def test_the_summary_counts_the_photos_with_several_faces_and_says_which_was_cropped(tmp_path, wild_dir,
                                                                                     detector_dir, caplog):
    """A training photo with two people is cropped on one of them, the other's face left out: nothing but the
    manifest's n_faces column said so, and the summary counted it as one more "detected" face."""
    data = release_of(tmp_path, {"train": [("two.jpg", wild_dir / "fr_two_people.jpg"), ("n0.png", noise(0))],
                                 "valid": [("n1.png", noise(1))], "test": [("n2.png", noise(2))]})
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    params = PreprocessParams(workers=1, cnn_retry_side=0, no_face="whole_image", size=32)
    metrics = preprocess.preprocess_dataset(data, detector_dir, tmp_path / "faces", params)
    rows = {r["file_name"]: r for r in preprocess.read_faces_manifest(tmp_path / "faces")}
    assert rows["two.jpg"]["status"] == "face" and int(rows["two.jpg"]["n_faces"]) == 2
    assert metrics["total"]["face"] == 1 and metrics["total"]["whole_image"] == 3
    line = summary(caplog)
    assert "1 of them with more than one face" in line and "the largest cropped" in line, line


def test_the_summary_says_when_the_release_crop_fallback_had_no_release_crop(tmp_path, detector_dir, caplog):
    """``no_face: release_crop`` (the default) on photos without a ``NAME_face.jpg`` beside them (a data set of the
    user's own) skipped every faceless photo under "fallback release_crop for 0", with nothing saying why; and
    ``no_face: skip`` was reported as "fallback skip for 0", a fallback that does not exist."""
    data = release_of(tmp_path, {split: [(f"{split}.png", noise(i))] for i, split in enumerate(SPLITS)})
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    params = PreprocessParams(workers=1, cnn_retry_side=0, no_face="release_crop", size=32)
    metrics = preprocess.preprocess_dataset(data, detector_dir, tmp_path / "faces", params)
    assert metrics["total"]["no_face"] == 3
    line = summary(caplog)
    assert "3 without a release crop (NAME_face.jpg) to fall back on" in line, line

    caplog.clear()
    preprocess.preprocess_dataset(data, detector_dir, tmp_path / "faces", replace(params, no_face="skip"))
    line = summary(caplog)
    assert "fallback skip" not in line and "no fallback (preprocess.no_face=skip)" in line, line


# 3. A photo that kills its crop worker ---------------------------------------------------------------------------

_real_process = preprocess._process


def _dying_on_test1(task):
    """``_process``, but the worker that takes ``test1.jpg`` notes it (as ``_process`` does) and is killed, as the
    kernel's out-of-memory killer or a crash in dlib kills it."""
    if task.file_name == "test1.jpg":
        preprocess._worker["inflight"].write_text(f"{task.split}/{task.file_name}", encoding="utf-8")
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_process(task)


def test_a_photo_that_kills_its_worker_is_to_be_taken_out_of_the_source_not_the_fetched_copy(tmp_path, detector_dir,
                                                                                            monkeypatch):
    """The error said "take it out of its split's CSV" after naming the photo "under data/raw/appa-real":
    fetch_data's output, which a rerun rewrites from fetch_data.source (DVC restores an edited output), so the
    photo was back and killed the rerun again. The CSV to edit is the source's."""
    data, out = make_release(tmp_path), tmp_path / "out" / "faces"
    monkeypatch.setattr(preprocess, "_process", _dying_on_test1)
    with pytest.raises(WorkerDiedError) as e:
        preprocess.preprocess_dataset(data, detector_dir, out, replace(NOISE, workers=2))
    message = str(e.value)
    assert "'test/test1.jpg'" in message, message
    assert "gt_avg_test.csv" in message and "fetch_data.source" in message, message
