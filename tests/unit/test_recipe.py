"""The recipe runs each variant on the committed params.yaml with the keys its label names, and
rejects a bad --variants before any work."""

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

import faceage.features
import faceage.recipe as recipe
import faceage.tracking

REPO = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
FINETUNE_KEYS = {"freeze_blocks": 0, "layer_lr_decay": 1.0, "distill_weight": 0.0, "wise_ft": False}
# What `make quick-finetune` (`dvc exp run -S ...`) leaves in the workspace's params.yaml.
FINETUNE = ["train.backbone=dlib_age", "train.epochs=12", "train.lr=0.003", "train.layer_lr_decay=0.316",
            "train.freeze_blocks=4", "train.distill_weight=1.0", "train.wise_ft=true"]


class Stop(Exception):
    """Raised by the fake train_model: the test has what it wanted."""


@pytest.fixture
def no_work(monkeypatch):
    """Every expensive step fails the test if it starts."""
    def work(*args, **kwargs):
        raise AssertionError("expensive work started")

    monkeypatch.setattr(faceage.tracking, "setup_mlflow", work)
    monkeypatch.setattr(faceage.features, "compute_features", work)
    monkeypatch.setattr(recipe, "External", work)
    monkeypatch.setattr(recipe, "train_model", work)
    monkeypatch.setattr(recipe, "setup_logging", lambda: None)  # keep caplog's handler


@pytest.mark.parametrize("argv, message", [
    (["--dlib-age", "--variants", "naive,bogus"], "unknown ['bogus']"),
    (["--variants", "bogus"], "--dlib-age"),
    (["--variants", "naive", "--external", "/nonexistent"], "--dlib-age"),
])
def test_variants_are_checked_before_any_work(tmp_path, monkeypatch, no_work, capsys, argv, message):
    """An unknown key failed only after the external set and the chips were built; without --dlib-age it
    was ignored (exit 0, empty report)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        recipe.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture
def git_repo(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def commit(repo: Path) -> None:
    subprocess.run(["git", "add", "params.yaml"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "params"], cwd=repo, check=True)


@pytest.mark.parametrize("where", ["workspace", "commit"])
@pytest.mark.parametrize("variant", list(recipe.AGE_VARIANTS))
def test_each_dlib_age_variant_runs_with_the_keys_its_label_names(git_repo, monkeypatch, no_work, caplog, variant,
                                                                   where):
    """After `make quick-finetune` the row "naive: every layer, lr 1e-4" ran with freeze_blocks 4,
    layer_lr_decay 0.316, distill_weight 1.0 and wise_ft (the workspace's params.yaml); committed
    fine-tuning values must not leak into a variant either."""
    if where == "commit":
        apply_overrides(git_repo / "params.yaml", FINETUNE)
        commit(git_repo)
    else:
        commit(git_repo)
        apply_overrides(git_repo / "params.yaml", FINETUNE)
    trained = []

    def train_model(tp, *args, **kwargs):
        trained.append(tp)
        raise Stop

    monkeypatch.setattr(faceage.tracking, "setup_mlflow", lambda: None)
    monkeypatch.setattr(faceage.features, "compute_features", lambda *a, **k: None)
    monkeypatch.setattr(recipe, "train_model", train_model)
    with caplog.at_level(logging.WARNING), pytest.raises(Stop):
        recipe.main(["--dlib-age", "--no-dlib-face", "--variants", variant])
    label, overrides = recipe.AGE_VARIANTS[variant]
    tp = trained[0]
    expected = {**FINETUNE_KEYS, "epochs": recipe.AGE_BASE["epochs"], "lr": recipe.AGE_BASE["lr"], **overrides}
    assert {key: getattr(tp, key) for key in expected} == expected, label
    assert tp.backbone == "dlib_age"
    if where == "workspace":  # each key the workspace changed is named
        for key in ("train.freeze_blocks", "train.layer_lr_decay", "train.distill_weight", "train.wise_ft",
                    "train.epochs", "train.lr", "train.backbone"):
            assert f"{key} is " in caplog.text


def test_dlib_face_rows_compute_descriptors_when_the_embed_stage_kept_chips(tmp_path, monkeypatch):
    """After `make quick` (dlib_age) data/embeddings.npz holds chips: the recipe's dlib_face rows crashed
    with "KeyError: 'embeddings is not a file in the archive'"."""
    import numpy as np

    import faceage.preprocess

    monkeypatch.setattr(faceage.preprocess, "read_faces_manifest", lambda faces: [{"crop": "a.png"}, {"crop": "b.png"}])
    computed = []
    monkeypatch.setattr(faceage.features, "compute_features",
                        lambda backbone, faces, detector, out: computed.append((backbone, out)))
    chips = tmp_path / "chips.npz"  # what embed writes for dlib_age
    np.savez(chips, kind=np.array("dlib_age"), crops=np.array(["a.png", "b.png"]), chips=np.zeros((2, 3, 4, 4)))
    out = tmp_path / "descriptors.npz"
    assert recipe._descriptors(chips, tmp_path, tmp_path, out) == out and computed == [("dlib_face", out)]
    partial = tmp_path / "partial.npz"  # descriptors of other faces
    np.savez(partial, crops=np.array(["a.png"]), embeddings=np.zeros((1, 2, 128)))
    assert recipe._descriptors(partial, tmp_path, tmp_path, out) == out and len(computed) == 2
    full = tmp_path / "full.npz"
    np.savez(full, crops=np.array(["a.png", "b.png"]), embeddings=np.zeros((2, 2, 128)))
    assert recipe._descriptors(full, tmp_path, tmp_path, out) == full and len(computed) == 2


def test_the_cnn_rows_train_as_the_profile_their_title_names(tmp_path):
    """The --cnn rows, titled after `make quick-resnet`, trained with train.low_res 0.5 where the profile (and the
    CPU sweep) sets 0.0: lower-resolution faces slow a 5-epoch run from scratch (13.94 against 13.13)."""
    import re
    import shlex

    from faceage.config import load_params

    makefile = (REPO / "Makefile").read_text().replace("\\\n", " ")
    profile = [arg for arg in shlex.split(re.search(r"^QUICK_RESNET :=(.*)$", makefile, re.M).group(1))
               if arg.startswith("train.")]
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_overrides(params, profile)  # each value as DVC writes it
    trained = load_params(params).train
    keys = [arg.split("=")[0].removeprefix("train.") for arg in profile]
    assert {key: recipe.CNN_BASE.get(key) for key in keys} == {key: getattr(trained, key) for key in keys}
