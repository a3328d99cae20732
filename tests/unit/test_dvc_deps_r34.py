"""dvc.yaml against what each stage really runs, reads and writes (round 34 review).

``dvc repro`` reruns a stage only when one of its ``deps``, ``params`` or ``outs`` changed: a module, data file or
params key a stage reads but does not list leaves a stale output reported up to date, and one it lists but never
reads reruns it for nothing. ``tests/unit/test_dvc_deps.py`` follows plain absolute imports; here the closure also
follows relative imports and imports by a literal name (``importlib.import_module("faceage.x")``,
``__import__``), and a dynamic import by a computed name must be accounted for; each stage's params reads are
computed from its script (not a hand-kept table); the paths each ``cmd`` passes are deps or outs, the files the
code writes into an output folder are declared outs, and the ``-S`` forms the README documents (lists, list
items, booleans, exponents, ``++``, ``params.yaml:``) and every key set to its own value parse into the typed
config as ``dvc exp run -S`` writes them.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from faceage.config import Params, load_params, section_keys

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "faceage"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
NOT_A_DEPENDENCY = {f"{PACKAGE}/__init__.py"}  # the package docstring and a sys.path fix: decides no output
# Imports that can only refuse a params value, never change an output: listed, the module's whole closure (torch's
# model code) would rerun fetch_data, preprocess and embed for every edit of it.
VALIDATION_ONLY = {
    ("faceage/config.py", "faceage/model.py"): "check_train_backbone asks model.check_backbone whether a "
                                               "train.backbone outside FAST_BACKBONES can be built (raise or not)",
}
# Imports by a computed name, with the literal names they can take: each must be in the closure already.
COMPUTED_IMPORTS = {
    "faceage/preprocess.py": ("CODE_MODULES", "code_fingerprint hashes the crop code it imports by name"),
    "faceage/predict.py": ("RUNTIMES", "the service's runtime by name (torch or onnx)"),
}


def _module_file(name: str) -> str | None:
    """``faceage/x.py`` for the module ``faceage.x`` (or ``faceage/x/__init__.py``); None outside the package."""
    if name.split(".")[0] != PACKAGE:
        return None
    base = Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (REPO / candidate).is_file():
            return candidate.as_posix()
    return None


def _constant_strings(tree: ast.AST, name: str) -> list[str]:
    """The string constants of the module-level tuple or dict (its values) assigned to ``name``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            values = node.value.values if isinstance(node.value, ast.Dict) else getattr(node.value, "elts", [])
            return [v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    raise AssertionError(f"no module-level {name} found")


def module_imports(path: str) -> tuple[set[str], list[str]]:
    """The package modules ``path`` imports (absolute, relative, or by a literal name through
    ``importlib.import_module`` / ``__import__``, anywhere in the file), and the line numbers of imports by a
    computed name."""
    tree = ast.parse((REPO / path).read_text(), path)
    package = Path(path).parent.as_posix().replace("/", ".")
    found: set[str] = set()
    computed: list[str] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names = [arg.value]
                else:
                    computed.append(f"{path}:{node.lineno}")
        for name in names:
            file = _module_file(name)
            if file:
                found.add(file)
    return found, computed


def import_closure(script: str) -> dict[str, list[str]]:
    """Every package module ``script`` can run, each with one import chain; validation-only edges not followed."""
    chains: dict[str, list[str]] = {}
    todo = [(script, [script])]
    while todo:
        path, chain = todo.pop()
        modules, _ = module_imports(path)
        for module in sorted(modules):
            if module not in chains and (path, module) not in VALIDATION_ONLY:
                chains[module] = chain + [module]
                todo.append((module, chains[module]))
    return {m: c for m, c in chains.items() if m not in NOT_A_DEPENDENCY}


def python_stages() -> dict[str, str]:
    return {name: m.group(1) for name, stage in STAGES.items()
            if (m := re.search(r"python\s+(stages/\w+\.py)", stage["cmd"]))}


def paths_of(entries: list) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def outputs_of(stage: dict) -> set[str]:
    """Every file or folder a stage writes: its ``outs`` and its stage-level ``metrics`` and ``plots``."""
    return paths_of(stage.get("outs")) | paths_of(stage.get("metrics")) | paths_of(stage.get("plots"))


# --- code deps ---------------------------------------------------------------------------------------------------

def test_the_closure_follows_relative_and_literal_dynamic_imports(tmp_path, monkeypatch):
    """The import forms test_dvc_deps.py does not follow: a relative import and import_module of a literal name."""
    root = tmp_path / "repo"
    (root / PACKAGE).mkdir(parents=True)
    (root / "stages").mkdir()
    for name in ("a", "b", "c", "d"):
        (root / PACKAGE / f"{name}.py").write_text("")
    (root / PACKAGE / "a.py").write_text("from . import b\nfrom .c import thing\n")
    (root / PACKAGE / "b.py").write_text("import importlib\nimportlib.import_module('faceage.d')\n")
    (root / "stages" / "s.py").write_text("def main():\n    from faceage.a import run\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", root)
    assert set(import_closure("stages/s.py")) == {f"{PACKAGE}/{n}.py" for n in "abcd"}


def test_config_import_of_the_model_module_is_the_one_validation_only_edge():
    """config.py imports faceage.model by name; if that ever stops being a mere check, the exemption must go."""
    modules, _ = module_imports("faceage/config.py")
    assert "faceage/model.py" in modules
    source = (REPO / "faceage/config.py").read_text()
    uses = re.findall(r'import_module\("faceage\.model"\)\.(\w+)', source)
    assert uses == ["check_backbone"], uses


@pytest.mark.parametrize("stage", sorted(python_stages()))
def test_stage_deps_are_exactly_the_modules_it_can_run(stage):
    script = python_stages()[stage]
    deps = paths_of(STAGES[stage]["deps"])
    closure = import_closure(script)
    missing = {m: c for m, c in closure.items() if m not in deps}
    assert script in deps
    assert not missing, f"stages.{stage}.deps lacks: " + "; ".join(f"{m} via {' -> '.join(c)}"
                                                                 for m, c in sorted(missing.items()))
    extra = sorted(d for d in deps if d.startswith(f"{PACKAGE}/") and d not in closure)
    assert not extra, f"stages.{stage}.deps lists {extra}, which {script} never imports: edits rerun it for nothing"


@pytest.mark.parametrize("stage", sorted(python_stages()))
def test_a_computed_import_in_a_stage_reaches_only_modules_already_in_its_deps(stage):
    closure = import_closure(python_stages()[stage])
    deps = paths_of(STAGES[stage]["deps"])
    for module in closure:
        _, computed = module_imports(module)
        if not computed:
            continue
        assert module in COMPUTED_IMPORTS, f"{computed}: an import by a computed name; account for it here"
        table, _why = COMPUTED_IMPORTS[module]
        targets = {_module_file(n) for n in _constant_strings(ast.parse((REPO / module).read_text()), table)}
        assert targets <= deps, f"stages.{stage}: {module} imports {sorted(targets - deps)} by name ({table})"


def test_the_stage_scripts_read_no_environment_variable():
    """DVC cannot see an environment variable: a stage script that reads one decides outputs DVC does not track
    (the library's own reads are the tracking URI and torchrun's rank variables, which name runs, not results)."""
    for script in set(python_stages().values()):
        text = (REPO / script).read_text()
        reads = re.findall(r"os\.environ(?:\.get)?[\[(]\s*[\"'](\w+)", text) + re.findall(r"getenv\([\"'](\w+)", text)
        assert set(reads) <= {"LOCAL_RANK", "LOCAL_WORLD_SIZE"}, (script, reads)


# --- params ------------------------------------------------------------------------------------------------------

SECTIONS = list(Params.__dataclass_fields__)

# Keys a stage reads that decide only how its work is run, never its outputs: not listed under the stage's
# ``params:``, so that ``dvc exp run -S`` of one reruns nothing. Each must be shown output-neutral by a real run
# (tests/unit/test_workers_r35.py); every other key a stage reads must still be declared.
RUNTIME_ONLY = {
    "preprocess.workers": "crop processes: each photo is cropped alike in the stage's process or a worker, and the "
                          "rows come back in photo order (the same bytes with 1 or 2 workers)",
    "embed.workers": "descriptor processes: dlib's face descriptors of each crop alike in any process, in crop "
                     "order (the same embeddings.npz with 1 or 2 workers)",
    "train.num_workers": "data-loader processes: each face's draws are seeded by (seed, epoch, face) wherever they "
                         "are made, and the lower-resolution augmentation runs on one torch thread in the training "
                         "process too (the same batches with 0, 1 or 2 workers)",
}


def params_reads(script: str) -> set[str]:
    """The ``section.key``s ``script`` reads from ``load_params(...)``: a section passed on whole counts as all of
    its keys; one read key by key (``params.train.backbone``, or through a name bound to the section) as those."""
    tree = ast.parse((REPO / script).read_text())
    whole: set[str] = set()  # names bound to load_params(...)
    section_of: dict[str, str] = {}  # names bound to one section

    def section_expr(node: ast.AST) -> str | None:
        if isinstance(node, ast.Attribute) and node.attr in SECTIONS:
            inner = node.value
            if (isinstance(inner, ast.Call) and getattr(inner.func, "id", "") == "load_params") or (
                    isinstance(inner, ast.Name) and inner.id in whole):
                return node.attr
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for target, value in zip(targets, values):
                if not isinstance(target, ast.Name):
                    continue
                if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "load_params":
                    whole.add(target.id)
                elif section := section_expr(value):
                    section_of[target.id] = section
    reads: set[str] = set()
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in ast.walk(tree):
        section = section_expr(node)
        if isinstance(node, ast.Name) and node.id in section_of and isinstance(node.ctx, ast.Load):
            section = section_of[node.id]
        if section is None:
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Assign) and not isinstance(node, ast.Name):
            continue  # the binding itself: its uses are counted through the name
        if isinstance(parent, ast.Tuple) and isinstance(parents.get(parent), ast.Assign) and \
                parents[parent].value is parent:
            continue
        if isinstance(parent, ast.Attribute) and parent.value is node:
            reads.add(f"{section}.{parent.attr}")
        else:
            reads.update(section_keys(section))
    return reads


@pytest.mark.parametrize("stage", sorted(python_stages()))
def test_stage_params_are_exactly_the_keys_its_script_reads(stage):
    """Not a hand-kept table: a key read and not listed is not rerun by `dvc exp run -S`; listed and not read,
    it reruns the stage for nothing. check_sources always runs, so its list documents what it reads."""
    reads = params_reads(python_stages()[stage])
    listed = set(STAGES[stage].get("params", []))
    assert reads, f"{stage}: no load_params reads found in its script"
    assert not listed & set(RUNTIME_ONLY), f"stages.{stage}.params lists runtime-only {sorted(listed & set(RUNTIME_ONLY))}"
    reads -= set(RUNTIME_ONLY)
    assert reads == listed, f"stages.{stage}.params: missing {sorted(reads - listed)}, not read {sorted(listed - reads)}"


def test_params_reads_sees_keys_read_one_by_one_and_sections_passed_whole():
    assert params_reads("stages/embed.py") == {"train.backbone", "embed.workers"}
    assert params_reads("stages/preprocess.py") == set(section_keys("preprocess"))
    assert params_reads("stages/check_sources.py") == {"fetch_data.source", "fetch_data.md5", "evaluate.external",
                                                       "train.pretrained", "train.backbone"}


def test_every_params_key_is_read_by_some_stage():
    """A key no stage lists changes nothing in `dvc repro` (an `-S` of it is a no-op experiment): only a runtime-only
    key may be so, and each of those is a key of params.yaml."""
    listed = {k for stage in STAGES.values() for k in stage.get("params", [])}
    assert set(RUNTIME_ONLY) <= set(Params().flat())
    assert set(Params().flat()) - set(RUNTIME_ONLY) == listed


# --- outs --------------------------------------------------------------------------------------------------------

def cmd_paths(stage: str) -> dict[str, str]:
    args = shlex.split(STAGES[stage]["cmd"])
    return {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--") and args[i] != "--params"}


# Folders passed whole whose files are declared one by one (the folder also holds what is not an output), and the
# resumable state train deletes once its outputs are in place.
OUTPUT_FOLDERS = {("train", "--reports"): "faceage/training.py", ("evaluate", "--out"): "faceage/evaluation.py"}
TRANSIENT = {("train", "--state")}


@pytest.mark.parametrize("stage", sorted(python_stages()))
def test_every_path_a_stage_is_given_is_a_dep_or_an_out(stage):
    deps, outs = paths_of(STAGES[stage].get("deps")), outputs_of(STAGES[stage])
    for flag, path in cmd_paths(stage).items():
        if (stage, flag) in TRANSIENT:
            assert path not in outs
            continue
        if (stage, flag) in OUTPUT_FOLDERS:
            assert any(o.startswith(path + "/") for o in outs), (stage, flag)
            continue
        assert path in deps | outs, f"stages.{stage}: {flag} {path} is neither a dep nor an out"


def test_every_out_a_later_stage_reads_is_its_dep_and_every_dep_is_made_or_tracked():
    made = {out: name for name, stage in STAGES.items() for out in outputs_of(stage)}
    for name, stage in STAGES.items():
        for dep in paths_of(stage.get("deps")):
            assert dep in made or (REPO / dep).exists(), f"stages.{name}: dep {dep} is neither an out nor in git"
        for path in cmd_paths(name).values():
            if path in made and made[path] != name:
                assert path in paths_of(stage["deps"]), f"stages.{name} reads {path} ({made[path]}'s) undeclared"


@pytest.mark.parametrize("stage,flag", sorted(OUTPUT_FOLDERS))
def test_the_files_written_into_an_output_folder_are_declared_outs(stage, flag):
    folder = cmd_paths(stage)[flag]
    outs = {o.removeprefix(folder + "/") for o in outputs_of(STAGES[stage]) if o.startswith(folder + "/")}
    source = (REPO / OUTPUT_FOLDERS[(stage, flag)]).read_text()
    variable = {"train": r"reports_dir", "evaluate": r"out"}[stage]
    written = set(re.findall(rf"\b{variable} / \"([\w.]+)\"", source))
    written |= set(re.findall(r"summary = reports_dir / \"([\w.]+)\"", source))
    assert written, f"{OUTPUT_FOLDERS[(stage, flag)]}: no file names found"
    assert written <= outs, f"stages.{stage}: writes {sorted(written - outs)} into {folder} undeclared"


def test_metrics_are_git_kept_stage_metrics_and_no_plain_out_is_uncached():
    """A `cache: false` file among a stage's plain `outs` keeps DVC from saving that stage to its run cache (only
    stage-level metrics and plots may be uncached): going back to params already run retrained for minutes. The
    metrics files are stage `metrics:` kept in git (`dvc exp show`, `dvc metrics diff` read them from commits);
    every top-level metric and plot is a file some stage writes."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    uncached = [(name, path) for name, stage in STAGES.items() for out in stage.get("outs", []) if isinstance(out, dict)
                for path, opts in out.items() if (opts or {}).get("cache") is False]
    assert not uncached, f"plain `cache: false` outs (no run cache for their stage): {uncached}"
    stage_metrics = {}
    for stage in STAGES.values():
        for entry in stage.get("metrics", []):
            path, opts = (next(iter(entry.items())) if isinstance(entry, dict) else (entry, {}))
            stage_metrics[path] = opts or {}
    assert set(spec["metrics"]) == set(stage_metrics), "top-level metrics and the stages' metrics differ"
    for path, opts in stage_metrics.items():
        assert opts.get("cache") is False, f"{path}: a small metrics file, kept in git (cache: false)"
    files = set()
    for plot in spec["plots"]:
        if isinstance(plot, str):
            files.add(plot)
        else:
            (definition,) = plot.values()
            ys = definition["y"]
            files.update(ys if isinstance(ys, dict) else [ys])
    written = set().union(*(outputs_of(stage) for stage in STAGES.values()))
    assert files <= written, f"plots no stage writes: {sorted(files - written)}"


# --- dvc exp run -S ----------------------------------------------------------------------------------------------

def _apply(tmp_path: Path, overrides: list[str]):
    """``overrides`` applied to a copy of params.yaml as ``dvc exp run -S`` applies them (DVC's own function, after
    faceage.experiment's checks), then read as every stage reads it."""
    pytest.importorskip("dvc")
    from faceage.experiment import check_overrides, check_result

    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    check_overrides(overrides)
    check_result(tmp_path, overrides)
    from dvc.utils.hydra import apply_overrides

    for override in overrides:
        apply_overrides(tmp_path / "params.yaml", [override.partition(":")[2] if override.startswith("params.yaml:")
                                                  else override])
    return load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("overrides,key,expected", [
    (["evaluate.external=[]"], "evaluate.external", ()),
    (["evaluate.external=[/abs/a, /abs/b]"], "evaluate.external", ("/abs/a", "/abs/b")),
    (["evaluate.external.0=/data/other"], "evaluate.external", ("/data/other",)),
    (["evaluate.low_res=[0.5, 0.25]"], "evaluate.low_res", (0.5, 0.25)),
    (["evaluate.low_res.1=0.25"], "evaluate.low_res", (0.75, 0.25)),
    (["fetch_data.mirrors=[https://x.org/a.zip]"], "fetch_data.mirrors", ("https://x.org/a.zip",)),
    (["fetch_data.md5="], "fetch_data.md5", ""),
    (["train.augment=false"], "train.augment", False),
    (["train.amp=False"], "train.amp", False),
    (["train.lr=1e-5"], "train.lr", 1e-5),
    (["train.weight_decay=0"], "train.weight_decay", 0.0),
    (["train.pretrained=none"], "train.pretrained", "none"),
    (["train.scheduler=none"], "train.scheduler", "none"),
    (["++train.epochs=3"], "train.epochs", 3),
    (["params.yaml:train.epochs=3"], "train.epochs", 3),
    (["train.backbone=dlib_age", "train.ensemble_weight=0.5"], "train.ensemble_weight", 0.5),
    (["train.backbone=dlib_age", "train.epochs=12", "train.freeze_blocks=4", "train.layer_lr_decay=0.316",
      "train.distill_weight=1.0", "train.wise_ft=true"], "train.wise_ft", True),
])
def test_documented_override_forms_parse_into_the_typed_config(tmp_path, overrides, key, expected):
    params = _apply(tmp_path, overrides)
    section, name = key.split(".")
    value = getattr(getattr(params, section), name)
    assert value == expected and type(value) is type(expected), (overrides, value)


def test_every_key_set_to_its_own_value_reads_back_the_same(tmp_path):
    """`-S key=<value>` for every key, written as faceage.experiment writes the committed value back (a profile's
    reset): a key whose value does not survive DVC's round trip could never be reset or swept."""
    from faceage.experiment import override_value

    base = load_params(REPO / "params.yaml").flat()
    overrides = [f"{k}={override_value(list(v) if isinstance(v, tuple) else v)}" for k, v in base.items()]
    assert _apply(tmp_path, overrides).flat() == base
