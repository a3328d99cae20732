"""README claims checked against the code, dvc.yaml or the report they come from (round 29's docs review).

Reads text files (and imports two light modules): no ../shared, no model, well under a second.
"""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
RECIPE_DLIB_AGE = (REPO / "reports" / "recipe_dlib_age.md").read_text()
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_a_params_typo_stops_the_stage_the_readme_names():
    """The README said a typo in params.yaml stops `fetch_data`; check_sources runs first and loads (so validates)
    every section of params.yaml."""
    first = next(iter(DVC["stages"]))
    script = re.search(r"stages/(\w+)\.py", DVC["stages"][first]["cmd"]).group(1)
    assert "load_params(" in (REPO / "stages" / f"{script}.py").read_text()
    claim = re.search(r"so such a typo stops ([^,]+, `\w+`|`\w+`)", _flat(README))
    assert claim, "the README no longer says which stage a params typo stops"
    assert f"`{first}`" in claim.group(1), f"README: {claim.group(1)}; the first stage is {first}"


def test_the_remote_paragraph_names_every_cached_output():
    """Every DVC output that is not `cache: false` goes to the remote: the README's list must name each one
    (check_sources' records were missing, and the no-op pull below it relies on them)."""
    cached = []
    for stage in DVC["stages"].values():
        for out in stage.get("outs", []):
            path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if (opts or {}).get("cache", True):
                cached.append(path)
    paragraph = _flat(README)
    start = paragraph.index("The cached outputs (")
    listed = paragraph[start:paragraph.index(") go to a DVC remote", start)]
    missing = [p for p in cached if f"`{p}`" not in listed]
    assert not missing, f"cached outputs the README's remote paragraph does not name: {missing}"


def test_download_retry_statuses_as_quoted():
    """The README said every 5xx is retried with back-off; the downloader retries a fixed set."""
    from faceage.download import RETRY_STATUSES

    quoted = re.search(r"A busy server \(HTTP ([0-9, -]+)\) is retried", _flat(README)).group(1)
    statuses = set()
    for part in quoted.split(","):
        low, _, high = part.strip().partition("-")
        statuses.update(range(int(low), int(high or low) + 1))
    assert statuses == set(RETRY_STATUSES)


def test_smaller_faces_zero_shot_figures_are_the_reports():
    """The "Smaller faces" paragraph quoted 8.77 -> 10.71 and a mean error of -2.9 -> -6.0, which no report
    records; it now quotes round 6's zero-shot pipeline run (utk-external at full size, 0.75 and 0.5)."""
    full, at_075, at_05 = re.search(
        r"its MAE goes from (\d+\.\d+) to (\d+\.\d+) years \((\d+\.\d+) at 32 px; round 6 of the report\)",
        _flat(README)).groups()
    row = next(line for line in RECIPE_DLIB_AGE.splitlines()
               if line.startswith("| zero-shot (`-S train.epochs=0`) | 5.70 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == full and cells[5] == f"{at_075} / {at_05}", row


def test_the_champion_guard_quotes_the_scored_utk_external_faces():
    """The guard's "about 3 standard errors" is quoted on utk-external's scored faces: 1,742 since round 20's
    CNN look (the README said ~1,650)."""
    quoted = re.search(r"an MAE on utk-external's ([\d,]+) scored faces", _flat(README)).group(1)
    assert quoted == "1,742"
    assert "utk-external **7.07** on 1,742 faces" in RECIPE_DLIB_AGE
