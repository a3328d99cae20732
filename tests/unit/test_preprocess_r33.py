"""Round 33: an interrupted ``preprocess`` goes on from where it stopped.

``dvc repro`` deletes ``data/faces`` before it runs the stage, so the crops done so far are kept beside it, in
``.faces.partial``; a rerun of the same job (same photos, same crop settings, same code) reuses every photo whose
crop, chips and manifest row were all written, redoes the rest, and writes the output an uninterrupted run writes.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import faceage.preprocess as preprocess
from faceage.appa_real import fetch_appa_real
from faceage.config import PreprocessParams
from tests.conftest import REPO, make_subset
from tests.unit.test_crops_r30 import fill_the_disk_at_save, make_release

# 16 px noise has no face: the whole_image fallback crops every photo (a crop, chips and a row each), and no
# detector look is slow. Runs without ../shared.
NOISE = PreprocessParams(workers=1, cnn_retry_side=0, no_face="whole_image", size=32)
RESUMED = re.compile(r"resuming (?:preprocess|external set \S+) from (\S+): reusing (\d+) of (\d+) photos done before, (\d+) to go")




def output(folder) -> dict:
    """Every file of a preprocess output: bytes, except chips.npz (its arrays, compared one by one)."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != "chips.npz"}
    with np.load(folder / "chips.npz") as z:
        files["chips.npz"] = {k: z[k] for k in z.files}
    return files


def assert_same_output(a, b) -> None:
    left, right = output(a), output(b)
    assert sorted(left) == sorted(right)
    for name, value in left.items():
        if name == "chips.npz":
            assert sorted(value) == sorted(right[name])
            for key in value:
                np.testing.assert_array_equal(value[key], right[name][key], err_msg=key)
        else:
            assert value == right[name], name


def interrupt_at_save(monkeypatch, after: int) -> None:
    """Ctrl-C arrives while the crop after the first ``after`` is being written (a half-written PNG on disk)."""
    save, calls = Image.Image.save, []

    def save_then_stop(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) > after:
            with open(fp, "wb") as f:  # half a PNG, as a kill during the write leaves
                f.write(b"\x89PNG\r\n")
            raise KeyboardInterrupt
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_stop)


def resumed(caplog) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m.groups()[1:])) for r in caplog.records if (m := RESUMED.search(r.getMessage()))]


def partial(out):
    return out.parent / f".{out.name}.partial"


# --- 1. interrupted, then resumed: the output of a straight run --------------------------------------------------

def test_an_interrupted_preprocess_resumes_and_writes_what_a_straight_run_writes(tmp_path, detector_dir,
                                                                                 monkeypatch, caplog):
    data, straight, out = _straight_then_interrupted(tmp_path, detector_dir, monkeypatch, after=3)
    assert not out.exists() and partial(out).is_dir()  # the work done so far is kept beside the output

    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    metrics = preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    # 3 written whole; the 4th was half-written when stopped: redone
    assert resumed(caplog) == [(3, 6, 3)]
    assert metrics["total"]["whole_image"] == 6
    assert_same_output(straight, out)
    assert not partial(out).exists()  # gone once the output is placed
    assert sorted(p.name for p in out.parent.iterdir()) == ["faces"]


def test_a_straight_run_leaves_nothing_beside_its_output_and_logs_no_resume(tmp_path, detector_dir, caplog):
    data = make_release(tmp_path)
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    preprocess.preprocess_dataset(data, detector_dir, tmp_path / "out" / "faces", NOISE)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["faces"]
    assert resumed(caplog) == []
    # a rerun (dvc repro -f) starts over: nothing is kept from the run before
    preprocess.preprocess_dataset(data, detector_dir, tmp_path / "out" / "faces", NOISE)
    assert resumed(caplog) == []


def test_a_torn_record_and_a_corrupt_crop_are_redone(tmp_path, detector_dir, monkeypatch, caplog):
    """A power loss can leave a record's last bytes unwritten, or a crop's: only whole, verified photos count."""
    data, straight, out = _straight_then_interrupted(tmp_path, detector_dir, monkeypatch, after=4)
    records = sorted((partial(out) / "records").iterdir())
    assert len(records) == 1
    records[0].write_bytes(records[0].read_bytes()[:-10])  # the 4th photo's record, torn
    crops = sorted(p for p in partial(out).rglob("*.png"))
    (partial(out) / "train" / "train0.png").write_bytes(b"\0" * 100)  # the 1st photo's crop, zeroed
    assert len(crops) == 5

    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    assert resumed(caplog) == [(2, 6, 4)]
    assert_same_output(straight, out)


# --- 2. only the same job resumes --------------------------------------------------------------------------------

def _straight_then_interrupted(tmp_path, detector_dir, monkeypatch, after):
    """:func:`_interrupted`, and the same release's straight (uninterrupted) output to compare with."""
    data, out = _interrupted(tmp_path, detector_dir, monkeypatch, after=after)
    straight = tmp_path / "a" / "faces"
    preprocess.preprocess_dataset(data, detector_dir, straight, NOISE)
    return data, straight, out


def _interrupted(tmp_path, detector_dir, monkeypatch, params=NOISE, after=3):
    data = make_release(tmp_path)
    out = tmp_path / "out" / "faces"
    interrupt_at_save(monkeypatch, after=after)
    with pytest.raises(KeyboardInterrupt):
        preprocess.preprocess_dataset(data, detector_dir, out, params)
    monkeypatch.undo()
    return data, out


def test_other_crop_settings_start_over_and_say_why(tmp_path, detector_dir, monkeypatch, caplog):
    data, out = _interrupted(tmp_path, detector_dir, monkeypatch)
    other = PreprocessParams(workers=1, cnn_retry_side=0, no_face="whole_image", size=48)
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    preprocess.preprocess_dataset(data, detector_dir, out, other)
    assert resumed(caplog) == []
    lines = [r.getMessage() for r in caplog.records if "starting over" in r.getMessage()]
    assert len(lines) == 1 and "crop settings" in lines[0] and str(partial(out)) in lines[0], lines
    straight = tmp_path / "straight" / "faces"
    preprocess.preprocess_dataset(data, detector_dir, straight, other)
    assert_same_output(straight, out)
    assert Image.open(out / "test" / "test0.png").size == (48, 48)


def test_the_worker_count_is_not_part_of_the_job(tmp_path, detector_dir, monkeypatch, caplog):
    """Lowering preprocess.workers after a worker ran out of memory must not throw the work away."""
    data, out = _interrupted(tmp_path, detector_dir, monkeypatch)
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    preprocess.preprocess_dataset(data, detector_dir, out,
                                  PreprocessParams(workers=2, cnn_retry_side=0, no_face="whole_image", size=32))
    assert resumed(caplog) == [(3, 6, 3)]
    straight = tmp_path / "straight" / "faces"
    preprocess.preprocess_dataset(data, detector_dir, straight, NOISE)
    assert_same_output(straight, out)


def test_another_photo_list_starts_over(tmp_path, detector_dir, monkeypatch, caplog):
    data, out = _interrupted(tmp_path, detector_dir, monkeypatch)
    csv = data / "gt_avg_test.csv"
    csv.write_text(csv.read_text().replace("test1.jpg,10,30,", "test1.jpg,10,35,"))  # a label corrected
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    assert resumed(caplog) == []
    lines = [r.getMessage() for r in caplog.records if "starting over" in r.getMessage()]
    assert len(lines) == 1 and "photos" in lines[0], lines
    rows = preprocess.read_faces_manifest(out, "test")
    assert [r["apparent_age"] for r in rows] == ["30.0", "35.0"]


def test_a_photo_replaced_since_is_redone(tmp_path, detector_dir, monkeypatch, caplog):
    """A photo rewritten in place (same list, same settings): its crop is redone, the others reused."""
    data, out = _interrupted(tmp_path, detector_dir, monkeypatch)
    photo = data / "train" / "train1.jpg"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(photo)
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    assert resumed(caplog) == [(2, 6, 4)]
    assert np.asarray(Image.open(out / "train" / "train1.png")).min() == 200


def test_another_code_version_starts_over(tmp_path, detector_dir, monkeypatch, caplog):
    data, out = _interrupted(tmp_path, detector_dir, monkeypatch)
    monkeypatch.setattr(preprocess, "code_fingerprint", lambda: "edited")
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    assert resumed(caplog) == []
    lines = [r.getMessage() for r in caplog.records if "starting over" in r.getMessage()]
    assert len(lines) == 1 and "code" in lines[0], lines


def test_a_full_disk_keeps_the_crops_done_and_says_so(tmp_path, detector_dir, monkeypatch, caplog):
    from faceage.atomic import WriteError

    data = make_release(tmp_path)
    out = tmp_path / "out" / "faces"
    fill_the_disk_at_save(monkeypatch, 2)
    with pytest.raises(WriteError) as e:
        preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    assert "(at valid/valid0.png)" in str(e.value) and f"kept in {partial(out)}" in str(e.value), str(e.value)
    monkeypatch.undo()
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    assert resumed(caplog) == [(2, 6, 4)]


# --- 3. real photos, a real kill -----------------------------------------------------------------------------------

KILLED = """
import sys
from faceage.config import PreprocessParams
from faceage.preprocess import preprocess_dataset
preprocess_dataset(sys.argv[1], sys.argv[2], sys.argv[3], PreprocessParams(workers=2, cnn_retry_side=0, size=64))
"""


def test_a_killed_preprocess_of_real_photos_resumes_to_the_straight_output(tmp_path, sample_dir, detector_dir,
                                                                           caplog):
    """kill -9 of the stage and its two workers mid-run, on real photos of the sample (HOG, chips, crops)."""
    data = tmp_path / "data"
    fetch_appa_real(str(make_subset(sample_dir, tmp_path / "source", {"train": 24, "valid": 8, "test": 8})), data,
                    md5="")
    params = PreprocessParams(workers=2, cnn_retry_side=0, size=64)
    out = tmp_path / "b" / "faces"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(data), str(detector_dir), str(out)], env=env,
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.parent.glob(".faces*/*/*.png"))) >= 8:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and its workers, as a killed machine stops them
        proc.wait(30)
    assert not out.exists()

    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    preprocess.preprocess_dataset(data, detector_dir, out, params)
    [(reused, total, todo)] = resumed(caplog)
    assert total == 40 and reused >= 6 and reused + todo == total
    straight = tmp_path / "a" / "faces"
    preprocess.preprocess_dataset(data, detector_dir, straight, params)
    assert_same_output(straight, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["faces"]


# --- 4. two runs into one output -----------------------------------------------------------------------------------

def test_a_second_run_into_the_same_output_waits_for_the_first(tmp_path, detector_dir, caplog):
    """Two runs would crop into one partial folder, and the first to finish removes it under the other: the
    second waits for the first (a lock on the folder itself: no lock file is left behind)."""
    import threading

    data = make_release(tmp_path)
    out = tmp_path / "out" / "faces"
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    finished = []
    with preprocess._holding(partial(out), out):  # a first run, holding the folder
        thread = threading.Thread(target=lambda: finished.append(
            preprocess.preprocess_dataset(data, detector_dir, out, NOISE)))
        thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("waiting for another preprocess" in r.getMessage()
                                                      for r in caplog.records):
            time.sleep(0.01)
        [waiting] = [r.getMessage() for r in caplog.records if "waiting for another preprocess" in r.getMessage()]
        assert f"that writes {out} (lock on" in waiting  # the output both write, not its parent folder
        assert thread.is_alive() and not out.exists()
        # the first run ends: its folder is removed under its lock
        shutil.rmtree(partial(out))
    thread.join(60)
    assert finished and finished[0]["total"]["whole_image"] == 6
    assert sorted(p.name for p in out.parent.iterdir()) == ["faces"]


def test_stopped_after_the_last_crop_the_rerun_crops_nothing(tmp_path, detector_dir, monkeypatch, caplog):
    """Ctrl-C while chips.npz is written (every photo done): the rerun only writes the output."""
    data = make_release(tmp_path)
    out = tmp_path / "out" / "faces"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess, "save_chips", stopped)
    with pytest.raises(KeyboardInterrupt):
        preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    monkeypatch.undo()
    monkeypatch.setattr(preprocess, "_crop_one", lambda task: pytest.fail(f"{task.file_name} cropped again"))
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    assert resumed(caplog) == [(6, 6, 0)]
    monkeypatch.undo()
    straight = tmp_path / "straight" / "faces"
    preprocess.preprocess_dataset(data, detector_dir, straight, NOISE)
    assert_same_output(straight, out)
