"""Round 37 review of the profile runner (faceage.experiment) and the recipe report (faceage.recipe), against a real
`dvc exp run` in a temporary git + DVC repo.

1. A profile that sets one item of a list (`-S evaluate.low_res.0=0.6`, `-S evaluate.external.0=/data/other`, the
   README's nested-key form) after an earlier `dvc exp run -S` had changed that list applied its item to the list the
   workspace was left with, not to the committed one: it ran with `low_res: [0.6, 0.8, 0.7]` without a word, or was
   refused with "evaluate.external has 0 items" where the committed list has one. The key was taken as the profile's
   own, so nothing was put back; now the committed value is put back *before* the profile's overrides.
2. `-S /abs/path/params.yaml:train.epochs=5` (DVC's file prefix, as an absolute path: `dvc exp run` applies it to
   params.yaml) was taken for another file's key: the runner's reset of the workspace's train.epochs to the committed
   30 came after it and won, so the run trained 30 epochs (and the warning said so), and the value was not checked.
3. The recipe's delta column was headed with the first word of its first row's label: "test vs make", "test vs the".
4. `python -m faceage.recipe --no-dlib-face --force` ran nothing and replaced the committed report with an empty one.
5. A SIGINT sent to the runner alone (`kill -INT`) never reaches `dvc exp run`, which runs to its end; the runner
   then said that dvc "has stopped": the experiment was complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

from faceage.config import parse_params

REPO = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
# A one-stage pipeline that reads params.yaml as the real stages do: what the run saw is in out.json
STAGE = """stages:
  s:
    cmd: python -c "import json, yaml; json.dump(yaml.safe_load(open('params.yaml')), open('out.json', 'w'))"
    params:
      - train
      - evaluate
    outs:
      - out.json:
          cache: false
"""


@pytest.fixture
def dvc_repo(tmp_path):
    """A real git + DVC repo: the project's params.yaml and a one-stage dvc.yaml, committed."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text(STAGE)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "init"], cwd=root, check=True)
    return root


def run_profile(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m faceage.experiment -S ...` in ``root``, as `make quick` runs it: a real `dvc exp run`."""
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    args = [a for o in overrides for a in ("-S", o)]
    return subprocess.run([sys.executable, "-m", "faceage.experiment", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


# 1. a list item set on top of a list an earlier run changed ----------------------------------------------------

@pytest.mark.parametrize(("left", "override", "key", "expected"), [
    # an earlier profile measured other fractions: the item landed on its list, [0.6, 0.8, 0.7], without a word
    ("evaluate.low_res=[0.9,0.8,0.7]", "evaluate.low_res.0=0.6", "low_res", [0.6, 0.5]),
    # an earlier run skipped the external sets: refused, "evaluate.external has 0 items", though the commit has one
    ("evaluate.external=[]", "evaluate.external.0=/data/other", "external", ["/data/other"]),
    # a plain `dvc exp run -S ~evaluate.external` removed the key: refused, "params.yaml has no key"
    ("~evaluate.external", "evaluate.external.0=/data/other", "external", ["/data/other"]),
])
def test_a_list_item_lands_on_the_committed_list(dvc_repo, left, override, key, expected):
    apply_overrides(dvc_repo / "params.yaml", [left])  # DVC's own code: what `dvc exp run -S` leaves
    done = run_profile(dvc_repo, override)
    assert done.returncode == 0, done.stderr
    assert json.loads((dvc_repo / "out.json").read_text())["evaluate"][key] == expected  # what the stage read
    assert parse_params((dvc_repo / "params.yaml").read_text())["evaluate"][key] == expected
    assert f"evaluate.{key}" in done.stderr  # the warning names the key put back under the profile's item


# 2. DVC's file prefix as a path other than `params.yaml` --------------------------------------------------------

def test_an_absolute_params_yaml_prefix_is_the_profiles_own_key(dvc_repo):
    apply_overrides(dvc_repo / "params.yaml", ["train.epochs=12"])  # left by an earlier profile
    done = run_profile(dvc_repo, f"{dvc_repo / 'params.yaml'}:train.epochs=5")
    assert done.returncode == 0, done.stderr
    assert json.loads((dvc_repo / "out.json").read_text())["train"]["epochs"] == 5
    assert "train.epochs=30" not in done.stderr


@pytest.mark.parametrize("prefix", ["{root}/params.yaml", "../repo/params.yaml"])
def test_a_value_refused_behind_any_params_yaml_prefix_stops_before_dvc(dvc_repo, prefix):
    before = (dvc_repo / "params.yaml").read_bytes()
    done = run_profile(dvc_repo, f"{prefix.format(root=dvc_repo)}:train.epochs=abc")
    assert done.returncode == 1, done.stderr
    assert "train.epochs must be an integer, got 'abc'" in done.stderr and "Reproducing" not in done.stdout
    assert (dvc_repo / "params.yaml").read_bytes() == before


# 3. the recipe's table names its baseline row -------------------------------------------------------------------

def _row(variant: str, test_mae: float) -> dict:
    return {"variant": variant, "val_mae": test_mae, "test_mae": test_mae, "coverage_1std": 0.7,
            "coverage_2std": 0.9, "run_id": "0123456789abcdef"}


@pytest.mark.parametrize(("key", "baseline"), [
    ("finetune", "make quick-finetune"), ("fused", "make quick"), ("naive", "naive"), ("zero-shot", "zero-shot"),
    ("low-lr", "every layer, lower lr"), ("ensemble", "the network frozen, an ensemble of MLP heads")])
def test_the_delta_column_names_the_row_it_is_measured_against(key, baseline):
    """`--dlib-age --variants finetune,naive` headed its delta column "test vs make", `--variants ensemble` "test vs
    the", `low-lr` "test vs every": the first word of the first row's label, which names no row."""
    from faceage.recipe import AGE_VARIANTS, _table

    label = AGE_VARIANTS[key][0]
    header, _, first, second = _table([_row(label, 5.0), _row(AGE_VARIANTS["naive"][0], 5.25)]).splitlines()
    assert f"| test vs {baseline} |" in header
    assert label.startswith(baseline)
    assert "| +0.00 |" in first and "| +0.25 |" in second


# 4. a recipe with nothing to run -------------------------------------------------------------------------------

def test_a_recipe_with_every_family_off_does_not_replace_an_existing_report(tmp_path):
    """`python -m faceage.recipe --no-dlib-face --force` (without --dlib-age or --cnn) trained nothing and wrote its
    report with no table over the committed reports/recipe.md, exit 0. Refused now, before any work (to a new
    --out the header alone is still written: tests/unit/test_recipe_r31.py writes it so)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "params"], cwd=root, check=True)
    report = root / "reports" / "recipe.md"
    report.parent.mkdir()
    report.write_text("the committed report\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "faceage.recipe", "--no-dlib-face", "--force"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "nothing to run" in done.stderr and "--dlib-age" in done.stderr and "--cnn" in done.stderr
    assert report.read_text() == "the committed report\n"
    assert not (tmp_path / "mlflow.db").exists()


# 5. an interruption `dvc exp run` never got -------------------------------------------------------------------

@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_sigint_to_the_runner_alone_does_not_claim_that_dvc_stopped(dvc_repo):
    """`kill -INT <runner>` (not the terminal's Ctrl-C to the whole group) reaches the runner alone; it waits for
    `dvc exp run`, which ran its stage to the end and kept the experiment, and then said "the `dvc exp run` it had
    started has stopped": the user reran hours of training that had completed."""
    import signal
    import time

    (dvc_repo / "dvc.yaml").write_text(STAGE.replace(
        "cmd: python -c \"", "cmd: python -c \"import pathlib, time; pathlib.Path('up').touch(); time.sleep(3); "))
    subprocess.run([*GIT, "commit", "-q", "-am", "a stage that takes 3 s"], cwd=dvc_repo, check=True)
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    runner = subprocess.Popen([sys.executable, "-m", "faceage.experiment", "-S", "train.epochs=5"], cwd=dvc_repo,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (dvc_repo / "up").exists():
            assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()
            time.sleep(0.05)
        runner.send_signal(signal.SIGINT)  # to the runner alone
        out, err = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    assert json.loads((dvc_repo / "out.json").read_text())["train"]["epochs"] == 5  # the stage ran to its end
    assert runner.returncode == -signal.SIGINT, err
    assert "has stopped" not in err, err
    assert "ran to its end" in err and "interrupted (Ctrl-C)" in err, err
