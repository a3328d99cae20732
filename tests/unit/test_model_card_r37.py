"""Round 37 review of the model card: written whole and as UTF-8, whatever the locale; table cells that hold a
data set's own labels cannot break their table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from faceage.model_card import write_model_card

REPO = Path(__file__).resolve().parents[2]
GROUP = {"group": "20-29", "n": 3, "mae_years": 4.0, "bias_years": 0.5}
METRICS = {"mae_years": 4.0, "mae_real_years": 4.1, "rmse_years": 5.0, "cs5": 0.6, "baseline_mae_years": 9.0,
           "n_test_faces": 3, "temperature": 1.0, "mean_predicted_std": 3.0, "coverage_1std": 0.7,
           "coverage_2std": 0.95, "external": {}}
META = {"backbone": "resnet18", "min_age": 0, "max_age": 100, "image_size": 64, "val_mae": 4.0,
        "mlflow_run_id": "r" * 32,
        "crop": {"detector": "hog", "upsample": 1, "margin": 0.4, "size": 64, "detector_sha256": "f" * 64},
        "train_params": {"epochs": 3}}
DATASET = {"source": "https://example.org/appa-real-release.zip", "sha256": "d" * 64, "counts": {"train": 3}}

# Writes a card whose gender labels (read verbatim from the data set's CSVs) are not ASCII, over an older card.
SCRIPT = """
import sys
from tests.unit.test_model_card_r37 import DATASET, GROUP, META, METRICS
from faceage.model_card import write_model_card
gender = [{**GROUP, "group": "m\\u00e4nnlich"}, {**GROUP, "group": "weiblich"}]
write_model_card(sys.argv[1], METRICS, {"age_group": [GROUP], "gender": gender}, META, DATASET, None, None)
"""


def test_the_card_is_utf8_and_whole_under_an_ascii_locale(tmp_path):
    """Under an ASCII locale (``LC_ALL=C`` without Python's UTF-8 mode) a card with a non-ASCII demographic label
    ended evaluate in a UnicodeEncodeError after every metric was computed, and left the previous card an empty
    file: ``write_text`` truncated it before encoding failed. Packaging and GET /model_card read the card as UTF-8."""
    card = tmp_path / "model_card.md"
    card.write_text("# the previous card\n", encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(card)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    text = card.read_text(encoding="utf-8")
    assert "| m\u00e4nnlich | 3 | 4.00 | +0.50 |" in text
    assert text.startswith("# Model card: FaceAge resnet18") and text.endswith("- data sha256 `?`\n")
    assert [p.name for p in tmp_path.iterdir()] == ["model_card.md"]  # no staging file left beside it


def _cells(line: str) -> list[str]:
    """A Markdown table row's cells, as GitHub splits them: at each ``|`` not escaped by a backslash."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_a_demographic_label_with_a_pipe_or_a_line_break_keeps_its_table_whole(tmp_path):
    """Group labels come verbatim from the data set's CSVs: ``Asian|Indian`` split its row into one cell more
    than the header (every number shifted a column), and a quoted label with a line break ended the table."""
    race = [{**GROUP, "group": "Asian|Indian"}, {**GROUP, "group": "Other\nmixed", "bias_years": -0.25}]
    text = write_model_card(tmp_path / "card.md", METRICS, {"age_group": [GROUP], "race": race}, META, DATASET,
                            None, None).read_text(encoding="utf-8")
    lines = text.splitlines()
    start = lines.index("### By race")
    header, rule, *rows = lines[start + 1:start + 5]
    assert len(_cells(header)) == len(_cells(rule)) == 4
    assert [_cells(r) for r in rows] == [[r"Asian\|Indian", "3", "4.00", "+0.50"],
                                         ["Other mixed", "3", "4.00", "-0.25"]]
    assert lines[start + 5] == ""  # the table ends after its two rows
