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


# Keys a stage reads outside its own section: embed computes only what train.backbone reads.
CROSS_SECTION_READS = {"embed": ["train.backbone"]}


def test_each_dvc_stage_lists_exactly_its_sections_keys():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("fetch_data", "fetch_detector", "preprocess", "embed", "train", "evaluate"):
        expected = section_keys(name) + CROSS_SECTION_READS.get(name, [])
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
