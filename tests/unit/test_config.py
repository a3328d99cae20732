"""params.yaml -> typed Params: validation errors name the key; dvc.yaml lists exactly the keys each stage reads."""

from pathlib import Path

import pytest
import yaml

from faceage.config import ConfigError, Params, load_params, params_from_dict, section_keys

REPO = Path(__file__).resolve().parents[2]


def raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_load():
    # The workspace file may carry `dvc exp run -S` overrides, so only its validity is checked here.
    assert isinstance(load_params(REPO / "params.yaml"), Params)


def test_documented_defaults():
    p = Params()
    assert p.train.backbone == "resnet18"
    assert p.train.pretrained == "imagenet"
    assert p.preprocess.margin == 0.4
    assert p.fetch_data.source == "https://data.chalearnlap.cvc.uab.cat/AppaRealAge/appa-real-release.zip"
    assert p.fetch_data.mirrors == ("http://158.109.8.102/AppaRealAge/appa-real-release.zip",)


def test_unknown_key_is_named():
    raw = raw_params()
    raw["train"]["epoch"] = 3  # typo of epochs
    with pytest.raises(ConfigError, match=r"Unknown config key: train\.epoch\b"):
        params_from_dict(raw)


def test_unknown_section_is_named():
    raw = raw_params()
    raw["trian"] = {}
    with pytest.raises(ConfigError, match="Unknown config key: trian"):
        params_from_dict(raw)


def test_missing_key_is_named():
    raw = raw_params()
    del raw["preprocess"]["margin"]
    with pytest.raises(ConfigError, match=r"Missing config key: preprocess\.margin"):
        params_from_dict(raw)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "epochs", "five", r"train\.epochs must be an integer, got 'five'"),
        ("train", "epochs", 2.5, r"train\.epochs must be an integer"),
        ("train", "augment", "yes", r"train\.augment must be true or false"),
        ("train", "loss", "mse", r"train\.loss must be one of \['expectation_l1', 'label_distribution'\]"),
        ("preprocess", "detector", "haar", r"preprocess\.detector must be one of"),
        ("preprocess", "margin", 1.5 + 1, r"preprocess\.margin must be in \[0, 2\), got 2\.5"),
        ("preprocess", "retry_pad", -0.1, r"preprocess\.retry_pad must be in \[0, 1\], got -0\.1"),
        ("train", "epochs", -1, r"train\.epochs must be >= 0 \(0: evaluate the initial weights\), got -1"),
        ("train", "nproc_per_node", 3,
         r"train\.batch_size=64 \(the global batch\) must be divisible by train\.nproc_per_node=3"),
        ("train", "layer_lr_decay", 0, r"train\.layer_lr_decay must be in \(0, 1\], got 0"),
        ("fetch_data", "source", 3, r"fetch_data\.source must be a string"),
        ("fetch_data", "md5", "2701c6ec", r"fetch_data\.md5 must be 32 hex digits \(either case\) or \"\" to skip"),
        ("train", "low_res", 1.5, r"train\.low_res must be in \[0, 1\] \(a share of faces\), got 1\.5"),
        ("train", "low_res_min", 0, r"train\.low_res_min must be in \(0, 1\]"),
        ("evaluate", "low_res", [0.5, 1.0], r"evaluate\.low_res: each must be in \(0, 1\)"),
        ("train", "ensemble_distill", -1, r"train\.ensemble_distill must be >= 0, got -1"),
        ("train", "ensemble_weight", 1.2, r"train\.ensemble_weight must be auto or in \[0, 1\], got 1\.2"),
        ("train", "ensemble_weight", "best", r"train\.ensemble_weight must be one of \['auto'\] or a number, got 'best'"),
        ("evaluate", "cs_years", 1e-5, r"evaluate\.cs_years must be in \[0\.01, 100\] years, got 1e-05"),
        ("evaluate", "cs_years", 1e6, r"evaluate\.cs_years must be in \[0\.01, 100\] years, got 1000000\.0"),
    ],
)
def test_mistyped_or_out_of_range_value_is_named(section, key, value, message):
    raw = raw_params()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=message):
        params_from_dict(raw)


def test_an_md5_in_capitals_as_windows_prints_it_is_accepted():
    raw = raw_params()
    raw["fetch_data"]["md5"] = "2701C6EC291B242E6B4F8A0A56087A43"  # Get-FileHash, certutil
    assert params_from_dict(raw).fetch_data.md5 == "2701C6EC291B242E6B4F8A0A56087A43"


def test_ensemble_weight_is_auto_or_a_number():
    raw = raw_params()
    raw["train"]["backbone"] = "dlib_age"  # ensemble_weight is the ensemble head's (config.check_train_params)
    assert params_from_dict(raw).train.ensemble_weight == "auto"
    raw["train"]["ensemble_weight"] = 1
    assert params_from_dict(raw).train.ensemble_weight == 1.0
    raw["train"]["ensemble_weight"] = 0.5
    assert params_from_dict(raw).train.ensemble_weight == 0.5


def test_int_is_accepted_for_float_and_coerced():
    raw = raw_params()
    raw["train"]["lr"] = 1
    assert params_from_dict(raw).train.lr == 1.0
    assert isinstance(params_from_dict(raw).train.lr, float)


def test_flat_has_every_key_once():
    flat = Params().flat()
    assert flat["train.backbone"] == "resnet18"
    assert len(flat) == sum(len(section_keys(s)) for s in ("fetch_data", "fetch_detector", "preprocess", "embed", "train", "evaluate"))


from tests.unit.test_dvc_deps_r34 import RUNTIME_ONLY  # noqa: E402

# Keys a stage reads outside its own section: embed computes only what train.backbone reads.
CROSS_SECTION_READS = {"embed": ["train.backbone"]}


def test_each_dvc_stage_lists_exactly_its_sections_keys():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("fetch_data", "fetch_detector", "preprocess", "embed", "train", "evaluate"):
        # less the keys that decide only how the work runs (tests/unit/test_dvc_deps_r34.py, RUNTIME_ONLY)
        expected = [k for k in section_keys(name) if k not in RUNTIME_ONLY] + CROSS_SECTION_READS.get(name, [])
        assert sorted(stages[name]["params"]) == sorted(expected), name


def test_each_dvc_stage_depends_on_its_script_and_the_modules_it_imports():
    import ast

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        script = f"stages/{name}.py"
        assert script in stage["deps"], name
        tree = ast.parse((REPO / script).read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        for module in modules:
            # Shared plumbing (config, logging) is not a dependency of the stage's outputs.
            if module.startswith("faceage.") and module not in ("faceage.config", "faceage.logs"):
                assert module.replace(".", "/") + ".py" in stage["deps"], f"{name} imports {module}"


def test_values_written_by_dvc_exp_run_set_are_read_as_dvc_reads_them(tmp_path):
    """`dvc exp run -S train.lr=1e-5` writes `lr: 1e-05` (DVC's own override code, called here): a
    number in YAML 1.2, which DVC speaks, but a string to PyYAML's YAML 1.1, so every stage failed
    with 'train.lr must be a number, got '1e-05''."""
    from dvc.utils.hydra import apply_overrides

    from faceage.config import load_params

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    apply_overrides(params, ["train.lr=1e-5", "train.weight_decay=5e-5", "evaluate.cs_years=1e1"])
    assert "lr: 1e-05" in params.read_text()
    loaded = load_params(params)
    assert (loaded.train.lr, loaded.train.weight_decay, loaded.evaluate.cs_years) == (1e-5, 5e-5, 10.0)


@pytest.mark.parametrize(("text", "message"), [
    ("augment: yes", r"train\.augment must be true or false, got 'yes'"),  # a string to DVC (YAML 1.2) too
    ("lr: .inf", r"train\.lr must be a finite number, got inf"),
    ("weight_decay: .nan", r"train\.weight_decay must be a finite number, got nan"),
    ("weight_decay: -0.1", r"train\.weight_decay must be >= 0, got -0\.1"),
])
def test_values_yaml_1_1_took_or_torch_rejected_later_are_named(tmp_path, text, message):
    from faceage.config import load_params

    key = text.split(":")[0]
    lines = [f"  {text}" if line.startswith(f"  {key}:") else line
             for line in (REPO / "params.yaml").read_text().splitlines()]
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message):
        load_params(tmp_path / "params.yaml")


def test_an_evaluate_batch_size_below_one_is_named_before_training():
    raw = raw_params()
    raw["evaluate"]["batch_size"] = 0
    with pytest.raises(ConfigError, match=r"evaluate\.batch_size must be >= 1, got 0"):
        params_from_dict(raw)


@pytest.mark.parametrize("seed", [-1, 2**64, 2**63 - 1])
def test_a_seed_numpy_or_torch_cannot_take_is_refused_before_any_work(seed):
    """`train.seed: -1` ("random" to other tools) passed, and training failed after the data load, its MLflow
    run created, with NumPy's 'expected non-negative integer' (every epoch reseeds through a SeedSequence);
    the sampler's seed + epoch overflowed a signed 64-bit number in a later epoch."""
    raw = raw_params()
    raw["train"]["seed"] = seed
    with pytest.raises(ConfigError, match=rf"train\.seed must be in \[0, 2\*\*63 - train\.epochs\), got {seed}"):
        params_from_dict(raw)


def test_the_seeds_accepted_are_the_ones_training_can_use():
    import torch

    from faceage.training import EpochSampler, seed_epoch

    for seed in (0, 2**63 - 1 - raw_params()["train"]["epochs"]):
        raw = raw_params()
        raw["train"]["seed"] = seed
        p = params_from_dict(raw).train
        assert p.seed == seed
        torch.manual_seed(seed)  # the initial weights
        seed_epoch(seed, 0, 0)
        sampler = EpochSampler(range(10), 1, 0, shuffle=True, seed=seed)
        for epoch in (0, p.epochs):  # the order is seeded by (seed, epoch)
            sampler.set_epoch(epoch)
            assert sorted(i for i, _ in sampler) == list(range(10))
    torch.manual_seed(42)


@pytest.mark.parametrize("scalar", ["010", "-010", "0o10", "1:30", "1_000", "0x1F", "0b11", "08", "007", "1_0.5",
                                    ".5e3", "1e-05", "3.0", "1.", ".5", "+5", "-0", "0"])
def test_numbers_are_read_as_dvc_reads_them(scalar):
    """`seed: 010` trained with seed 8 (YAML 1.1 octal) while DVC, which speaks YAML 1.2, recorded and showed 10
    (`dvc exp show`, `dvc params diff`); `0o10` was a string here and 8 there, `1:30` 90 here and a string there."""
    from dvc.utils.serialize import parse_yaml

    from faceage.config import parse_params

    dvc, ours = parse_yaml(f"k: {scalar}\n", "params.yaml")["k"], parse_params(f"k: {scalar}\n")["k"]
    assert (type(ours), ours) == (type(dvc), dvc)
