"""Round-38 review of configuration and data sources: train.nproc_per_node=0 and a --params folder are one line, not
tracebacks; the release's per-rating files (the raters' gender) and per-split label files do not mislabel test faces;
a source folder holding the release one level down is fingerprinted by the release alone."""

import subprocess
import sys

import pytest
import yaml

from faceage.config import ConfigError, params_from_dict
from tests.conftest import REPO


def raw_params(**train) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(train)
    return raw


def test_nproc_per_node_zero_is_a_config_error_naming_the_key():
    """`dvc exp run -S train.nproc_per_node=0` raised ZeroDivisionError: the divisibility check of the global batch
    (batch_size % nproc_per_node) was computed before the range check that refuses 0 could speak."""
    with pytest.raises(ConfigError, match=r"train\.nproc_per_node must be >= 1, got 0"):
        params_from_dict(raw_params(nproc_per_node=0))


def test_check_sources_refuses_nproc_per_node_zero_in_one_line(tmp_path):
    """The always-run first stage, as `dvc repro` runs it: one line naming the key, no traceback."""
    raw = raw_params(nproc_per_node=0)
    raw["evaluate"]["external"] = []  # nothing to fingerprint: the params alone decide
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = subprocess.run([sys.executable, "stages/check_sources.py", "--params", str(params),
                          "--source", str(tmp_path / "source.json"), "--external", str(tmp_path / "external.json"),
                          "--pretrained", str(tmp_path / "pretrained.json")],
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    assert "train.nproc_per_node must be >= 1, got 0" in run.stderr + run.stdout
    assert not (tmp_path / "source.json").exists()  # refused before any record is written


# The APPA-REAL release ships its per-rating files beside the summaries: gt_<split>.csv, one row per rating, with the
# rater's age and gender (file_name,real_age,apparent_age,worker_age,worker_gender). fetch_data copies every extra
# CSV along, and evaluate reads gender/race labels from any column whose name holds "gender" or "race".
PER_RATING = "file_name,real_age,apparent_age,worker_age,worker_gender\n" \
             "000001.jpg,30,32,54,female\n000001.jpg,30,28,22,male\n000002.jpg,60,61,33,male\n"


def test_the_raters_gender_in_the_releases_per_rating_file_is_no_label_of_the_face(tmp_path):
    """Every test face of the real release was labelled with the gender of its last rater (worker_gender), and
    evaluate's per-gender MAE and the model card's bias rows reported the raters' genders as the faces'."""
    from faceage.appa_real import read_demographics

    (tmp_path / "gt_test.csv").write_text(PER_RATING)
    assert read_demographics(tmp_path, "test") == {}
    assert read_demographics(tmp_path) == {}


def test_a_labels_file_beside_the_raters_keeps_its_labels(tmp_path):
    """The faces' own labels (the 2018 allcategories files, columns file,gender,race,...) still count."""
    from faceage.appa_real import read_demographics

    (tmp_path / "gt_test.csv").write_text(PER_RATING)
    (tmp_path / "allcategories_test.csv").write_text("file,gender,race,makeup,time,happiness\n"
                                                      "000001.jpg,female,caucasian,makeup,20-30,happy\n")
    assert read_demographics(tmp_path, "test") == {"000001.jpg": {"gender": "female", "race": "caucasian"}}


def test_a_labels_file_named_for_one_split_labels_that_split_only(tmp_path):
    """The gender/race annotations of APPA-REAL come as one file per split (allcategories_train.csv, ..._valid,
    ..._test) with no split column: a name listed in two of them took the labels of whichever file sorted last
    (valid), for the test faces too, where a split column was already honoured."""
    from faceage.appa_real import read_demographics

    header = "file,gender,race,makeup,time,happiness\n"
    (tmp_path / "allcategories_test.csv").write_text(header + "000001.jpg,female,asian,makeup,20-30,happy\n")
    (tmp_path / "allcategories_train.csv").write_text(header + "000001.jpg,male,caucasian,no_makeup,20-30,neutral\n")
    (tmp_path / "allcategories_valid.csv").write_text(header + "000001.jpg,male,afroamerican,no_makeup,20-30,happy\n"
                                                       "000009.jpg,female,asian,makeup,20-30,happy\n")
    assert read_demographics(tmp_path, "test") == {"000001.jpg": {"gender": "female", "race": "asian"}}
    assert read_demographics(tmp_path, "valid") == {"000001.jpg": {"gender": "male", "race": "afroamerican"},
                                                    "000009.jpg": {"gender": "female", "race": "asian"}}


def test_a_source_folder_holding_the_release_one_level_down_is_known_by_the_release_alone(tmp_path):
    """fetch_data takes a folder holding the release one level down (where a zip was unzipped: ~/Downloads with
    appa-real-release/ in it), and reads the release alone; check_sources hashed the whole folder, the zip and every
    other download with it, on every run, and a new file there reran fetch_data, which copied the release again."""
    from faceage.sources import source_fingerprint
    from tests.unit.test_appa_real import make_release

    downloads = tmp_path / "Downloads"
    release = make_release(downloads / "appa-real-release")
    first = source_fingerprint(str(downloads))
    assert first["kind"] == "folder"
    assert first["sha256"] == source_fingerprint(str(release))["sha256"]  # the bytes fetch_data reads, wherever
    (downloads / "notes.txt").write_text("an unrelated download")
    assert source_fingerprint(str(downloads)) == first
    labels = release / "gt_avg_test.csv"
    labels.write_text(labels.read_text().replace("20.5", "50.5", 1))  # a relabelled face still reruns fetch_data
    assert source_fingerprint(str(downloads))["sha256"] != first["sha256"]


def test_a_params_path_that_is_a_folder_is_one_line_naming_it(tmp_path):
    """`--params` given a folder (`python stages/train.py --params .`, the repo instead of its params.yaml) ended in
    IsADirectoryError's traceback: the one OSError load_params let through."""
    from faceage.config import ConfigError, load_params

    with pytest.raises(ConfigError, match=rf"cannot read {tmp_path}: .*is a folder"):
        load_params(tmp_path)
