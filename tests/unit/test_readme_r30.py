"""README claims checked against the code (round 30's docs review): the service's environment settings, the
bento lock's package count, the HEIC suffixes a folder scan reads and the UI queue's default.

Reads text files (and imports two light modules): no ../shared, no model, well under a second.
"""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
ENV_NAME = re.compile(r"\bFACEAGE_[A-Z][A-Z0-9_]*\b")
# Set by the code for its own child processes, not by a user: the train stage relaunched under torchrun.
INTERNAL_ENV = {"FACEAGE_TRAIN_LAUNCHER_PID"}


def _flat(text: str) -> str:
    return " ".join(text.split())


def _env_read_by_code() -> set[str]:
    """Every FACEAGE_* name the project's code spells (library, service, stages, benchmarks, CI, test harness)."""
    files = [*(REPO / "faceage").glob("*.py"), *(REPO / "stages").glob("*.py"), *(REPO / "benchmarks").glob("*.py"),
             REPO / "service.py", REPO / "Makefile", REPO / ".ci" / "run", REPO / "tests" / "conftest.py"]
    return {name for f in files for name in ENV_NAME.findall(f.read_text())}


def test_every_environment_setting_the_readme_names_is_read_and_every_one_read_is_named():
    """A user sets what the README names: a name the code does not read does nothing, and a setting the code reads
    that the README does not name cannot be found."""
    in_readme = set(ENV_NAME.findall(README))
    in_code = _env_read_by_code() - INTERNAL_ENV
    assert not in_readme - in_code, f"README names settings no code reads: {sorted(in_readme - in_code)}"
    assert not in_code - in_readme, f"settings the code reads that README.md does not name: {sorted(in_code - in_readme)}"


def test_the_bento_lock_counts_are_the_files():
    """README: '`bento-requirements.txt` locks them and the N packages under them (M in all)'; pi-heif made it 100."""
    def pins(name: str) -> list[str]:
        lines = (REPO / name).read_text().splitlines()
        return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]

    direct, locked = pins("bento-requirements.in"), pins("bento-requirements.txt")
    m = re.search(r"locks them and the (\d+) packages under them \((\d+) in all\)", _flat(README))
    assert m, "the README's bento lock sentence changed: update this test"
    assert (int(m[1]), int(m[2])) == (len(locked) - len(direct), len(locked)), (m[0], len(direct), len(locked))


def test_the_heif_suffixes_a_folder_scan_reads_are_the_readmes():
    """README: 'HEIC/HEIF (`.heic .heics .heif .heifs .hif`)', the suffixes the CLI's folder scans read."""
    from faceage.cli import IMAGE_SUFFIXES

    m = re.search(r"HEIC/HEIF \(`([^`]+)`\)", README)
    assert m, "the README's HEIC/HEIF suffix list changed: update this test"
    heif = {s for s in IMAGE_SUFFIXES if s.startswith((".hei", ".hif"))}
    assert set(m[1].split()) == heif


def test_the_ui_queue_default_is_twice_the_uis_slots():
    """README: '`FACEAGE_UI_QUEUE_SIZE` (...; default twice the slots, 64; ...' and 'its share of the requests (32)'."""
    from faceage.http import Limits
    from faceage.ui import UI_QUEUE_FACTOR

    consts = {t.id: node.value for node in ast.parse((REPO / "service.py").read_text()).body
              if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    total = ast.literal_eval(consts["MAX_CONCURRENCY"])
    ui_share = consts["UI_MAX_CONCURRENCY"]
    assert ast.unparse(ui_share) == "MAX_CONCURRENCY // 2"
    slots = total // 2
    text = _flat(README)
    assert f"its share of the requests ({slots})" in text
    assert f"hold at most {slots} of the service's {total} concurrent requests" in text
    assert Limits().ui_queue_size == 0  # unset: build_ui's default, UI_QUEUE_FACTOR x the slots
    assert UI_QUEUE_FACTOR == 2 and f"default twice the slots, {UI_QUEUE_FACTOR * slots}" in text
