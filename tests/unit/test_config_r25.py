"""Round-25 review of configuration and run orchestration: an empty fetch_data.source, a float key given an
integer beyond a float's range, the recipe's head keys and its report, params.yaml's comment on train.head."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

import faceage.features
import faceage.recipe as recipe
import faceage.tracking
from faceage.config import ConfigError, TrainParams, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("override", ["fetch_data.source=", "fetch_data.source='  '"])
def test_an_empty_fetch_data_source_is_refused_before_any_work(tmp_path, override):
    """`dvc exp run -S fetch_data.source=$(realpath ../shared/datasets/appa-real-sample)` (the README's form) on a
    machine without that folder writes `source: ''`: the repo root itself. check_sources hashed the whole repo
    (.venv included) and fetch_data then said 'LayoutError: no gt_avg_train.csv found in <repo>'."""
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_overrides(params, [override])  # as DVC writes it
    with pytest.raises(ConfigError, match=r"fetch_data\.source is empty"):
        load_params(params)


@pytest.mark.parametrize(("key", "value"), [("lr", 10**400), ("ensemble_weight", 10**400), ("label_sigma", -10**400)],
                         ids=["lr", "ensemble_weight", "label_sigma-negative"])
def test_an_integer_too_large_for_a_float_is_named(key, value):
    """`lr: 1000...0` (401 digits) is a YAML integer: math.isfinite raised OverflowError, a traceback naming no key."""
    raw = raw_params()
    raw["train"][key] = value
    with pytest.raises(ConfigError, match=rf"train\.{key} must be .*a finite number"):
        params_from_dict(raw)


def test_params_yaml_names_the_keys_that_make_head_auto_dlibs_own_head():
    """The comment above `head:` said 'setting any key below (or epochs: 0) makes auto dlib's own head': four of
    the keys below it (ensemble_weight, ensemble_distill, distill_open_top, face_features) leave it fused."""
    from dataclasses import replace

    from faceage.finetune import resolve_head

    lines = (REPO / "params.yaml").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  head:"))
    start = at
    while lines[start - 1].lstrip().startswith("#"):
        start -= 1
    comment = " ".join(lines[start:at])
    base = replace(TrainParams(), backbone="dlib_age")
    assert resolve_head(base) == "fused"
    changes = {"epochs": 0, "freeze_blocks": 1, "layer_lr_decay": 0.5, "distill_weight": 1.0, "wise_ft": True,
               "ensemble_weight": 0.5, "ensemble_distill": 1.0, "distill_open_top": False, "face_features": "layers"}
    switching = {k for k, v in changes.items() if resolve_head(replace(base, **{k: v})) == "pretrained"}
    named = {k for k in changes if re.search(rf"\b{k}\b", comment)}
    assert named == switching, comment


@pytest.fixture
def git_repo(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(faceage.tracking, "setup_mlflow", lambda: None)
    monkeypatch.setattr(faceage.features, "compute_features", lambda *a, **k: None)
    monkeypatch.setattr(recipe, "setup_logging", lambda: None)
    return tmp_path


def commit(repo: Path, overrides: list[str]) -> None:
    apply_overrides(repo / "params.yaml", overrides)
    subprocess.run(["git", "add", "params.yaml"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "params"], cwd=repo, check=True)


class Stop(Exception):
    """Raised by the fake train_model once the run's params passed training's own check."""


@pytest.mark.parametrize("committed", [["train.backbone=dlib_age", "train.face_features=layers"],
                                       ["train.backbone=dlib_age", "train.head=fused"],
                                       ["train.backbone=dlib_age", "train.ensemble_weight=0.5"]])
@pytest.mark.parametrize("argv", [["--dlib-age", "--no-dlib-face", "--variants", "naive"],
                                  ["--dlib-age", "--no-dlib-face", "--variants", "zero-shot"],
                                  [],  # the dlib_face rows
                                  ["--no-dlib-face", "--cnn"]])
def test_every_recipe_row_runs_whatever_dlib_age_head_params_yaml_commits(git_repo, monkeypatch, committed, argv):
    """README: face_features=layers is an option, and committing params.yaml makes a value the base. With it (or a
    committed head or ensemble_weight) every recipe row without that head died in train_model with a ConfigError
    traceback ('train.face_features=layers chooses what the fused head reads ... no fused head'), after the chips."""
    from faceage.finetune import check_params

    commit(git_repo, committed)
    trained = []

    def train_model(tp, *args, **kwargs):
        check_params(tp)  # what train_model does first
        trained.append(tp)
        raise Stop

    monkeypatch.setattr(recipe, "train_model", train_model)
    monkeypatch.setattr(recipe, "_descriptors", lambda embeddings, *a: embeddings)
    with pytest.raises(Stop):
        recipe.main(argv)
    assert trained and trained[0].face_features == "descriptor" and trained[0].ensemble_weight == "auto"


@pytest.mark.parametrize("variant", ["naive", "low-lr", "layer-wise", "ensemble", "fused"])
def test_the_dlib_age_rows_start_from_dlibs_weights_whatever_params_yaml_commits(git_repo, monkeypatch, variant):
    """A committed train.pretrained=none (make quick-resnet's from-scratch setting made the base) passed training's
    check for these rows, which then trained dlib's network from random weights under labels that say fine-tuned."""
    from faceage.finetune import check_params

    commit(git_repo, ["train.pretrained=none"])
    trained = []

    def train_model(tp, *args, **kwargs):
        check_params(tp)
        trained.append(tp)
        raise Stop

    monkeypatch.setattr(recipe, "train_model", train_model)
    with pytest.raises(Stop):
        recipe.main(["--dlib-age", "--no-dlib-face", "--variants", variant])
    assert trained[0].backbone == "dlib_age" and trained[0].pretrained != "none"


@pytest.mark.parametrize("dataset", [True, False])
def test_the_recipe_report_is_written_after_its_runs_into_a_new_folder(git_repo, monkeypatch, dataset):
    """`--out reports/recipes/recipe.md` (or a --data without dataset.json) failed with FileNotFoundError when
    every variant had run: the table was lost."""
    commit(git_repo, [])
    data = git_repo / "data"
    data.mkdir()
    if dataset:
        (data / "dataset.json").write_text(json.dumps({"sha256": "ab" * 32, "source": "/sample"}))
    rows = []

    def run(name, *args, **kwargs):
        rows.append(name)
        return {"variant": name, "val_mae": 5.0, "test_mae": 5.5, "coverage_1std": 0.68, "coverage_2std": 0.95,
                "run_id": "0123456789", "model": "m.pt", "train_s": 1.0, "external_mae": float("nan")}

    monkeypatch.setattr(recipe, "_run", run)
    monkeypatch.setattr(recipe, "_descriptors", lambda embeddings, *a: embeddings)
    monkeypatch.setattr(recipe, "_tta_rows", lambda *a: [])
    out = git_repo / "reports" / "recipes" / "recipe.md"
    recipe.main(["--data", str(data), "--out", str(out)])
    report = out.read_text()
    assert rows == list(recipe.DLIB_VARIANTS) and "| default | 5.00 | 5.50 |" in report
    assert ("`abababababababab...`" in report) == dataset
