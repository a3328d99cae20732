"""Review round 28 of training: what a resumed run does with a state its code cannot load.

The end-to-end case trains for real (integration tier): a real sqlite MLflow store in the test's tmp_path, the
first faces of the shared sample.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from faceage.config import Params
from faceage.tracking import mlflow_env
from tests.integration.test_training import TINY, _faces_folder


def test_resume_loads_nothing_from_a_state_that_does_not_fit_the_network_and_all_of_one_that_does():
    """torch's load_state_dict copies the layers that fit before it raises on the others: a refused state must be
    checked before anything is loaded, so that training starts over from the initial weights."""
    from faceage.training import Amp, TrainState, _resume

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    amp = Amp(False, torch.float16, torch.amp.GradScaler("cuda", enabled=False))
    saved = {k: torch.full_like(v, 7.0) for k, v in initial.items()}
    two_groups = torch.optim.AdamW([{"params": list(net[0].parameters())}, {"params": list(net[1].parameters())}])
    for weights, best, optimizer in (({**saved, "2.weight": torch.zeros(1, 2)}, None, opt.state_dict()),
                                     (saved, {**saved, "1.bias": torch.zeros(3)}, opt.state_dict()),
                                     ({k: v for k, v in saved.items() if k != "1.bias"}, None, opt.state_dict()),
                                     (saved, saved, two_groups.state_dict())):
        state = TrainState("f", "r", epoch=1, model=weights, optimizer=optimizer, scheduler=sched.state_dict(),
                           best_model=best)
        assert _resume(state, net, opt, sched, amp, Path("state.pt")) is None
        assert all(torch.equal(initial[k], v) for k, v in net.state_dict().items())
        assert len(opt.param_groups) == 1
    state = TrainState("f", "r", epoch=1, model=saved, optimizer=opt.state_dict(), scheduler={**sched.state_dict(),
                       "last_epoch": 5}, best_model=saved)
    assert _resume(state, net, opt, sched, amp, Path("state.pt")) is state
    assert all(torch.equal(v, torch.full_like(v, 7.0)) for v in net.state_dict().values()) and sched.last_epoch == 5


@pytest.mark.integration
@pytest.mark.parametrize("misfit", ["layers", "optimizer"])
def test_a_state_that_does_not_fit_this_codes_network_starts_over_instead_of_failing_every_rerun(
        sample_dir, tmp_path, caplog, misfit):
    """The state is resumed for the same params and data, whatever the commit (resumed_at_commit). A commit that
    changes the network's layers (or its optimiser's parameter groups) under the same params left a state that
    load_state_dict refused with torch's traceback at every rerun, until the file was found and deleted by hand."""
    import mlflow

    from faceage import training
    from faceage.tracking import EXPERIMENT, setup_mlflow

    caplog.set_level("INFO", logger="faceage")
    faces = _faces_folder(sample_dir, tmp_path / "faces", n_train=4, n_valid=2)
    p = replace(Params().train, **{**TINY, "epochs": 1})
    fingerprint = training._fingerprint(p, faces, None, training.pretrained_files(p, None, None))
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        setup_mlflow()
        client = mlflow.MlflowClient()
        old = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
        model = training.build_model(p.backbone)
        if misfit == "layers":  # the older code's network: one layer more
            weights = {**model.state_dict(), "classifier.9.weight": torch.zeros(101, 1024)}
            optimizer = {}
        else:  # the same layers, the parameters split into other groups
            weights = model.state_dict()
            optimizer = torch.optim.AdamW([{"params": [next(model.parameters())]},
                                           {"params": list(model.parameters())[1:]}]).state_dict()
        training.save_state(tmp_path / "state.pt", training.TrainState(
            fingerprint, run_id=old, epoch=1, model=weights, optimizer=optimizer, history=[
                {"epoch": 1, "train_loss": 3.0, "train_mae": 9.0, "val_mae": 10.0, "lr": 1e-3,
                 "images_per_s": 5.0, "elapsed_s": 1.0}], best_val_mae=10.0, best_epoch=1, best_model=weights))
        result = training.train_model(p, faces, tmp_path / "model.pt", tmp_path / "reports", tmp_path / "run.json",
                                      tmp_path / "state.pt")
        assert client.get_run(old).info.status == "KILLED"  # nothing will continue it
        assert client.get_run(result["run_id"]).info.status == "FINISHED"
    assert result["run_id"] != old and result["best_epoch"] == 1 and not (tmp_path / "state.pt").exists()
    assert f"ignoring {tmp_path / 'state.pt'}: it does not fit" in caplog.text
    assert "resuming from epoch" not in caplog.text
    history = (tmp_path / "reports" / "history.csv").read_text().splitlines()
    assert len(history) == 2 and history[1].split(",")[3] != "10.0"  # epoch 1 trained here, not the state's row
