"""Round 25's final diff review: what the round's changes got wrong."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from faceage.sources import external_name

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("folder", "words"), [
    ("utk–external", "utk_external_"),  # an en dash: the words were joined, utkexternal_<hash>
    ("Bob’s photos", "bob_s_photos_"),  # a typographic apostrophe (macOS): bobs_photos_<hash>
])
def test_a_non_ascii_separator_in_a_set_name_still_separates(folder, words):
    """external_name's docstring: "lower-case ASCII, other characters as ``_``". Since round 25 a character
    with no ASCII spelling was dropped, not made a separator: `utk–external` became `utkexternal_...`
    (before the round, `utk_external`)."""
    name = external_name(folder)
    assert name.startswith(words) and len(name) == len(words) + 8
    # what the round meant to keep: accents spelt in Latin, other scripts a hash, plain names as they were
    assert external_name("visages-été") == "visages_ete"
    assert external_name("utk-external") == "utk_external"
    assert external_name("photos-日本") != external_name("photos-中国")


def test_python_c_inside_the_package_folder_finds_the_packaging_library():
    """faceage/__init__.py drops the package's own folder from sys.path[0] (where faceage/packaging.py hid the
    `packaging` library), but not "" (`python -c`, the REPL), which is that folder when started inside it:
    ModuleNotFoundError "'packaging' is not a package" once mlflow (or anything) imported packaging.version."""
    code = "import faceage, packaging.version, sys; print(packaging.version.__file__)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # (an empty entry would be the current folder itself)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO / "faceage", env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "site-packages" in done.stdout
