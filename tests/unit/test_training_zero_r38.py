"""``train.epochs=0`` is the zero-shot model of ``dlib_age``, whose age head is dlib's. With any other backbone the
age head is new (random weights): the run evaluated and shipped it without a word, as if it were a zero-shot
baseline. It still runs (a mechanics check), with a warning naming the params."""

from __future__ import annotations

import logging

from faceage.config import TrainParams
from tests.unit.test_training_r30 import TINY, _faces, _train, store

FIXTURES = (store,)


def test_epochs_0_with_a_backbone_whose_head_is_new_warns_that_the_head_is_untrained(tmp_path, store, caplog):
    _faces(tmp_path / "faces")
    with caplog.at_level(logging.WARNING, logger="faceage.training"):
        result = _train(TrainParams(**{**TINY, "epochs": 0}), tmp_path)
    assert (tmp_path / "model.pt").exists() and result["best_val_mae"] > 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("train.epochs=0" in m and f"train.backbone={TINY['backbone']}" in m and "untrained" in m
               for m in warned), warned


def test_epochs_above_0_does_not_warn_about_the_head(tmp_path, store, caplog):
    _faces(tmp_path / "faces")
    with caplog.at_level(logging.WARNING, logger="faceage.training"):
        _train(TrainParams(**{**TINY, "epochs": 1}), tmp_path)
    assert not [r for r in caplog.records if "untrained" in r.getMessage()]
