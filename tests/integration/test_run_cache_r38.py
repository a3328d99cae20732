"""Round 38: going back to a param set already run restores preprocess, train and evaluate from DVC's run cache.

DVC saves a stage to its run cache only if every plain ``outs`` entry is cached (``dvc/stage/__init__.py``:
``no_cache_outs``; a ``cache: false`` file is allowed only as a stage-level metric or plot). Each of these stages
had a ``cache: false`` report among its ``outs``, so ``dvc exp run -S train.epochs=2`` then ``-S train.epochs=30``
(or ``make quick-finetune`` then ``make quick``) re-cropped, retrained and re-evaluated for minutes.
"""

import json

import pytest
import yaml

from tests.integration.test_pipeline_dvc import commit_all, new_project, run, stages_run

pytestmark = pytest.mark.integration


def set_params(root, margin: float, epochs: int) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["preprocess"]["margin"], params["train"]["epochs"] = margin, epochs
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_params_run_before_are_restored_from_the_run_cache_not_rerun(sample_dir, external_dir, tmp_path_factory):
    root, env = new_project(sample_dir, external_dir, tmp_path_factory)
    commit_all(root, env, "pipeline")
    margin = yaml.safe_load((root / "params.yaml").read_text())["preprocess"]["margin"]
    set_params(root, margin, 1)
    assert stages_run(run(["dvc", "repro"], root, env)) >= {"preprocess", "train", "evaluate"}
    first = {p: (root / p).read_bytes() for p in ("models/model.pt", "models/run.json", "reports/eval/metrics.json",
                                                   "reports/eval/predictions.csv", "reports/train/history.csv",
                                                   "reports/preprocess.json", "reports/model_card.md")}

    set_params(root, margin + 0.1, 2)  # another crop and another training: every stage after fetch_* reruns
    assert stages_run(run(["dvc", "repro"], root, env)) == {"preprocess", "train", "evaluate"}
    assert (root / "models" / "run.json").read_bytes() != first["models/run.json"]

    set_params(root, margin, 1)  # back to the first set: nothing runs, every output is the first run's
    back = run(["dvc", "repro"], root, env)
    assert stages_run(back) == set(), back[-3000:]
    for stage in ("preprocess", "embed", "train", "evaluate"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in back, back[-3000:]
    for path, data in first.items():
        assert (root / path).read_bytes() == data, path
    assert json.loads((root / "reports" / "eval" / "metrics.json").read_text())["n_test_faces"] == 8
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root, env))
    [metrics] = [rev["data"] for rev in shown.values()]  # the workspace: each metrics file once, as the first run's
    assert sorted(metrics) == ["reports/eval/metrics.json", "reports/preprocess.json", "reports/train/metrics.json"]
