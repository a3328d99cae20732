"""The README's commands and names checked against the files they name (round 35's walk through the README).

Every `make` target, `make VAR=` setting, `-S key=` override, quoted params default, CLI flag, repository path and
"see the section" pointer the README gives a user, and the headline Results row against the report's newest
reproduction. Reads text files only (params.yaml through yaml): no ../shared, no model, well under a second.
"""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
MAKEFILE = (REPO / "Makefile").read_text()
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
RECIPE_DLIB_AGE = (REPO / "reports" / "recipe_dlib_age.md").read_text()

# Keys the README quotes as mistakes the runner refuses: they must stay mistakes.
REFUSED_EXAMPLES = {"train.learning_rate", "train.epoch", "train.lr.x", "evaluate.external.3"}


def _commands() -> list[str]:
    """Every code span of the README and every line of its bash blocks (continuations joined, comments cut)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = [line.split("  #")[0].strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    return lines + re.findall(r"`([^`\n]+)`", prose)


def _has_key(key: str) -> bool:
    """Whether ``key`` (dotted, list items by number) is in params.yaml."""
    node = PARAMS
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _makefile_targets() -> set[str]:
    return set(re.search(r"^\.PHONY:(.*)$", MAKEFILE, re.M)[1].split())


def test_every_make_target_the_readme_names_is_in_the_makefile():
    named = {m[1] for c in _commands() for m in re.finditer(r"(?:^|[\s(&;])make ([a-z][\w-]*)(?![\w=-])", c)}
    assert {"setup", "quick", "test", "bento", "serve"} <= named, sorted(named)  # the extraction still finds them
    assert not named - _makefile_targets(), f"README names make targets the Makefile lacks: {sorted(named - _makefile_targets())}"


def test_every_make_setting_the_readme_names_is_the_makefiles_and_each_one_is_named():
    """`make quick SAMPLE=...`, `make serve SERVE_HOST=...`: a setting the Makefile does not read does nothing, and
    one it reads that the README never names cannot be found (`PY`, for a python3 older than 3.11; `IMAGE`)."""
    settable = set(re.findall(r"^([A-Z][A-Z0-9_]*) \?=", MAKEFILE, re.M))
    named = {m[1] for c in _commands() if re.search(r"\bmake\b", c) for m in re.finditer(r"\b([A-Z][A-Z0-9_]*)=", c)}
    named |= set(re.findall(r"`([A-Z][A-Z0-9_]*)(?:=|`)", README))
    assert {"SAMPLE", "SERVE_HOST"} <= named, sorted(named)
    assert not settable - named, f"Makefile settings the README never shows how to set: {sorted(settable - named)}"
    unknown = {n for n in named if n.startswith(("SERVE_", "MLFLOW_HOST", "MLFLOW_PORT", "MLFLOW_BACK", "MLFLOW_ART"))}
    assert unknown <= settable, f"README sets make variables the Makefile does not read: {sorted(unknown - settable)}"


def _overrides() -> list[str]:
    """The params key of every `-S key=...` / `-S +key=` / `-S ~key` the README shows, placeholders left out."""
    keys = []
    for c in _commands():
        for m in re.finditer(r"-S\s+['\"]?(?:params\.yaml:)?[+~]*([A-Za-z_][\w.<>]*)", c):
            if "<" not in m[1] and m[1] != "key" and not m[1].endswith("."):
                keys.append(m[1])
    return keys


def test_every_S_override_the_readme_shows_is_a_params_key():
    keys = set(_overrides())
    assert {"fetch_data.source", "train.backbone", "evaluate.external"} <= keys, sorted(keys)
    wrong = sorted(k for k in keys - REFUSED_EXAMPLES if not _has_key(k))
    assert not wrong, f"README shows -S overrides of keys params.yaml does not have: {wrong}"


@pytest.mark.parametrize("typed, meant", [("learning_rate", "lr"), ("epoch", "epochs")])
def test_the_mistyped_keys_the_readme_quotes_are_refused_by_name(tmp_path, typed, meant):
    """The README's examples of a refused key stay refused, with the message it quotes."""
    from faceage.config import ConfigError, load_params

    assert REFUSED_EXAMPLES.isdisjoint(k for k in REFUSED_EXAMPLES if _has_key(k))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"][typed] = raw["train"][meant]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_params(tmp_path / "params.yaml")
    assert f"train.{typed} (did you mean train.{meant}?)" in str(e.value)
    assert f"train.{typed} (did you mean train.{meant}?)" in " ".join(README.split())


def _quoted_defaults() -> list[tuple[str, str]]:
    """`section.key` (default VALUE ... and `section.key` (VALUE, ...: the defaults the README quotes."""
    sections = "|".join(PARAMS)
    found = re.findall(rf"`((?:{sections})\.\w+)` \((?:default )?`?(-?[\d.e-]+|true|false|auto|\[[^\]]*\])`?[,;) ]",
                       " ".join(README.split()))
    return found


def _value(text: str):
    """A quoted value as YAML 1.2 reads it (PyYAML, YAML 1.1, reads `1e-4` as a string)."""
    try:
        return float(text)
    except ValueError:
        return yaml.safe_load(text)


def test_the_defaults_the_readme_quotes_are_params_yamls():
    quoted = _quoted_defaults()
    assert len(quoted) >= 8, quoted
    for key, value in quoted:
        assert _has_key(key), key
        section, name = key.split(".")
        actual = PARAMS[section][name]
        assert _value(value) == actual, f"README: `{key}` ({value}); params.yaml: {actual!r}"


def test_params_yaml_and_the_config_defaults_agree():
    """A key left out of an override file falls back to nothing (missing keys are refused), but the dataclass
    defaults are what tests and benchmarks build; the README quotes params.yaml's, so the two must agree."""
    import dataclasses

    from faceage import config

    for section, values in PARAMS.items():
        cls = getattr(config, "".join(p.title() for p in section.split("_")) + "Params")
        for field in dataclasses.fields(cls):
            if field.name not in values:
                continue
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            default = list(default) if isinstance(default, tuple) else default
            assert default == values[field.name], f"{section}.{field.name}: params.yaml {values[field.name]!r}, {cls.__name__} {default!r}"


def _source_of(command: str) -> str:
    """The text that defines a command's flags: the script, and the benchmark modules it imports."""
    if command.startswith("faceage predict"):
        return (REPO / "faceage" / "cli.py").read_text()
    m = re.match(r"python -m faceage\.(\w+)", command)
    path = REPO / "faceage" / f"{m[1]}.py" if m else REPO / re.match(r"python (\S+\.py)", command)[1]
    assert path.exists(), f"README runs {command!r}: {path.relative_to(REPO)} does not exist"
    text = path.read_text()
    for module in re.findall(r"^from (?:benchmarks\.)?(\w+) import", text, re.M):
        sibling = path.parent / f"{module}.py"
        if sibling.exists():
            text += sibling.read_text()
    return text


def test_every_flag_the_readme_passes_to_a_project_command_exists():
    checked = 0
    for c in _commands():
        pattern = r"(python -m faceage\.\w+|python (?:benchmarks|stages|scripts)/\w+\.py|faceage predict)((?:\s+[^\s;&|]+)*)"
        for m in re.finditer(pattern, c):
            source = _source_of(m[1])
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m[2]):
                checked += 1
                assert flag == "--help" or f'"{flag}"' in source or f"'{flag}'" in source, \
                    f"README passes {flag} to {m[1]}, which has no such flag: {c[:120]}"
    assert checked >= 20, checked


def test_every_repository_path_the_readme_names_exists():
    """Code, tests and scripts the README sends a user to (pipeline outputs are not in a clone, so not checked)."""
    paths = set(re.findall(r"(?<![\w/.~-])((?:faceage|stages|benchmarks|tests|scripts|\.ci)/[\w./-]*\w)", README))
    assert len(paths) >= 30, sorted(paths)
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"README names paths that are not in the repo: {missing}"
    names = set(re.findall(r"\b(test_\w+\.py)\b", README))
    missing = sorted(n for n in names if not list((REPO / "tests").rglob(n)))
    assert not missing, f"README names test files that do not exist: {missing}"
    for link in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (REPO / link).exists(), link


def test_every_section_the_readme_points_to_is_a_heading():
    headings = [re.sub(r"^#+\s*", "", h) for h in re.findall(r"^#{2,4} .+$", README, re.M)]
    flat = " ".join(README.split())
    pointers = re.findall(r'(?:[Ss]ee|README,) "([^"]+)"', flat) + re.findall(r'"([^"]+)" (?:below|above)', flat)
    pointers += [p for pair in re.findall(r'\("([A-Z][^"]+)", "([A-Z][^"]+)"\)', flat) for p in pair]
    assert {"Results", "Serving"} <= set(pointers), pointers
    lost = sorted({p for p in pointers if not any(h.startswith(p) for h in headings)})
    assert not lost, f"README points to sections it does not have: {lost}"


def _newest_reproduction() -> re.Match:
    """The report's newest `make quick` reproduction with every figure (rounds are written newest first)."""
    m = re.search(r"(?s)## Round (\d+):(?:(?!\n## ).)*?val (\d\.\d+),\s+test (\d\.\d+) \(CS@5 (0\.\d+)\),\s+utk-external (\d\.\d+) on\s+"
                  r"([\d,]+) faces \(CS@5 (0\.\d+)\),\s+best epoch (\d+)", RECIPE_DLIB_AGE)
    assert m, "reports/recipe_dlib_age.md has no reproduction in the form the README quotes: update this test"
    return m


def _two(figure: str) -> str:
    """A three-decimal figure of the report at two decimals, half up as a reader rounds it (``.2f`` of the float
    7.055, stored as 7.05499..., gave 7.05)."""
    from decimal import ROUND_HALF_UP, Decimal

    return str(Decimal(figure).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def test_the_results_headline_row_quotes_the_reports_newest_reproduction():
    m = _newest_reproduction()
    rnd, val, test, cs5, utk, n_faces, utk_cs5, epoch = m.groups()
    row = next(line for line in README.splitlines() if "`make setup && make quick` (`dlib_age`" in line)
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    wall = " ".join(cells[2].split())
    newest = re.match(r"\*\*\d+ min \d+ s\*\* \(round (\d+), (.*?)\); \d+ min", wall)
    assert newest, f"the row no longer opens with its newest timing in bold: {wall[:80]}"
    assert newest[1] == rnd, f"the row's newest timing is round {newest[1]}, the report's newest reproduction round {rnd}"
    expected = (f"val {val}, test {_two(test)} ({test}), CS@5 {cs5}, utk-external {_two(utk)} "
                f"({utk} on {n_faces} faces), CS@5 {utk_cs5}, best epoch {epoch}")
    assert expected in newest[2], f"README: {newest[2]!r}; report round {rnd}: {expected!r}"
    assert cells[3].startswith(f"{_two(test)} (round {rnd}"), cells[3]
    baseline = float(re.search(r"test MAE of (\d+\.\d+)", README)[1])
    assert cells[4] == f"{float(test) / baseline:.2f}x (round {rnd})", cells[4]


def test_the_runners_refusals_the_quick_start_quotes_are_its_own(tmp_path):
    """Quick start: `-S train.learning_rate=3e-4` stops with the quoted line; `evaluate.external.3` and `train.lr.x`
    are named as steps that are not there; `train.epochs=abc` and `train.batch_size=0` are refused."""
    import shutil

    from faceage.experiment import ProfileError, check_result

    flat = " ".join(README.split())
    quoted = re.search(r"\(`-S (train\.learning_rate=3e-4)`: `([^`]+)`\)", flat)
    assert quoted, "the Quick start no longer quotes the runner's mistyped-key line: update this test"
    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(ProfileError) as e:
        check_result(tmp_path, [quoted[1]])
    assert quoted[2] in str(e.value)
    for override in ("evaluate.external.3=/x", "train.lr.x=1", "train.epochs=abc", "train.batch_size=0"):
        assert override.split("=")[0] in flat, override
        with pytest.raises(ProfileError) as e:
            check_result(tmp_path, [override])
        assert override.split("=")[0].split(".")[0] in str(e.value), (override, str(e.value))
    check_result(tmp_path, ["evaluate.external.0=/data/other"])  # the README's working nested key
    assert (tmp_path / "params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()
