"""Round 25 review of dlib_age's fine-tuning hooks: what a zero-shot run (train.epochs=0) says it does,
and the loss weights of train.age_balance for ages outside the model's 0..100."""

import logging
from dataclasses import replace

import pytest
import torch

from faceage.chips import DLIB_AGE
from faceage.config import TrainParams
from faceage.dlib_age import DlibAgeNet
from faceage.finetune import param_groups


@pytest.mark.parametrize(("epochs", "logged"), [(0, False), (1, True)])
def test_a_zero_shot_run_does_not_announce_frozen_stages_and_learning_rates(caplog, epochs, logged):
    """train.epochs=0 with fine-tuning keys (e.g. make quick-finetune's profile with -S train.epochs=0) trains
    nothing, yet logged "fine-tuning: 3 stage(s) frozen ..., lr [...]" as if it fine-tuned the network."""
    p = replace(TrainParams(), backbone=DLIB_AGE, epochs=epochs, freeze_blocks=3, layer_lr_decay=0.5)
    with caplog.at_level(logging.INFO, logger="faceage.finetune"):
        groups = param_groups(DlibAgeNet(101), p)
    assert len(groups) == 4  # block3, block4, block5, fc: what would train
    assert any("fine-tuning:" in r.getMessage() for r in caplog.records) is logged


def test_age_balance_reads_a_label_over_100_as_100():
    """One 116-year-old among 15 thirty-year-olds took 15.8 of the 16 faces' total loss weight at
    age_balance 0.5 (1000x a thirty-year-old), and all of it at 1: the density at 100, where its weight is
    looked up, did not count the face itself (its kernel sits at 116), so the floor density.max() * 1e-6 set it."""
    from faceage.training import age_balance_weights, age_index

    ages = torch.tensor([30.0] * 10 + [31.0] * 5 + [116.0])
    weights = age_balance_weights(ages, 0.5)[age_index(ages)]
    as_100 = age_balance_weights(ages.clamp(max=100.0), 0.5)[age_index(ages)]
    torch.testing.assert_close(weights, as_100)
    assert weights[-1] < 10 * weights[0]
