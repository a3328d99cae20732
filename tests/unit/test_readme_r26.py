"""Figures and pointers the docs repeat, checked against the report or section they come from (round 26's docs review).

Reads text files only: no ../shared, no model, well under a second.
"""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
RECIPE_DLIB_AGE = (REPO / "reports" / "recipe_dlib_age.md").read_text()


def _module_doc(name: str) -> str:
    return ast.get_docstring(ast.parse((REPO / "faceage" / f"{name}.py").read_text())) or ""


def _between(text: str, start: str, end: str) -> str:
    begin = text.index(start)
    return text[begin:text.index(end, begin + len(start))]


def test_layers_gender_gap_quoted_as_the_report_measured_it():
    """params.yaml, config.py and face_net.py said the `layers` head trails the zero-shot network on an unseen
    gender by "up to 1.3 years"; the report's five-seed table (round 16) has 1.14 at worst, and the 1.33 of
    round 15 was a head distilled at 20, not the option that ships (10)."""
    row = next(line for line in RECIPE_DLIB_AGE.splitlines() if line.startswith("| `layers` | men |"))
    worst = max(float(x) for x in re.findall(r"\(\+?(-?\d+\.\d+)\)", row)[:2])  # sample test, utk-external
    quoted = f"{worst:.1f}"
    texts = {"params.yaml": (REPO / "params.yaml").read_text(),
             "faceage/config.py": (REPO / "faceage" / "config.py").read_text(),
             "faceage/face_net.py": (REPO / "faceage" / "face_net.py").read_text()}
    for name, text in texts.items():
        claims = re.findall(r"up to (\d+\.\d+) years", text)
        assert claims, f"{name} no longer quotes the gap"
        assert all(c == quoted for c in claims), f"{name} says up to {claims} years; the report's worst seed: {worst}"


def test_finetune_docstring_points_at_the_report_that_measures_it():
    """faceage/finetune.py sent the reader to reports/recipe.md, which holds no dlib_age run at all."""
    reports = re.findall(r"reports/[\w.]+\.md", _module_doc("finetune"))
    assert reports
    for report in reports:
        text = (REPO / report).read_text()
        assert "WiSE-FT" in text and "distill_weight" in text, f"{report} measures no fine-tuning without forgetting"


def test_backbones_report_names_todays_make_quick_only_with_its_numbers():
    """reports/backbones.md called its dlib_age row (round 6's ensemble head, test 4.89) "the `make quick`
    recipe"; make quick is the fused head since round 7 (README's Results)."""
    backbones = (REPO / "reports" / "backbones.md").read_text()
    row = next(line for line in backbones.splitlines() if line.startswith("| `dlib_age` |"))
    row_test = row.split("|")[8].strip()
    results_row = next(line for line in README.splitlines() if "`make setup && make quick` (`dlib_age`" in line)
    quick_test = re.search(r"\| (\d+\.\d+) \(round \d+", results_row).group(1)
    for line in backbones.splitlines():
        if "`make quick`" in line and row_test != quick_test:
            assert quick_test in line, f"backbones.md names make quick beside a {row_test} row, not today's {quick_test}"


def test_quick_resnet_section_quotes_the_results_row():
    """The quick CPU profile's section gave 13.4 "(see Results)", where Results has 12.70 (round 20)."""
    section = _between(README, "### Quick CPU profile", "\n### ")
    results_row = next(line for line in README.splitlines() if line.startswith("| quick CPU profile"))
    latest = re.search(r"\| (\d+\.\d+) \(round \d+", results_row).group(1)
    assert latest in section, f"the section does not give Results' {latest}"


def test_external_crop_time_is_the_measured_one():
    """faceage/external.py said detecting utk-external's 1,743 faces takes "about a minute"; the README's
    measurement with the pipeline's crop settings (bench_external_crops.py, round 22) is 21.6 s."""
    measured = re.search(r"- (\d+(?:\.\d+)?) s to detect and crop", README).group(1)
    assert f"{measured} s" in _module_doc("external")


# --- round 26's README walkthrough: this round's serving and benchmark changes, said where a user reads them ---

def _route_row(route: str) -> str:
    return next(line for line in README.splitlines() if line.startswith(f"| `{route}"))


def test_crop_route_counts_faces_in_the_predict_order():
    """/crop?face=i indexes the faces as /predict lists them (faces.subject_order: largest first, ties to the most
    central); the route table said only "face i", and the OpenAPI page says "largest first" without the tie rule."""
    row = _route_row("POST /crop")
    assert "largest first" in row and "most central" in row, row


def test_annotate_route_says_labels_shrink_to_the_face():
    """Round 26 draws each label no wider than its face (annotate._label_font), down to MIN_FONT_PX."""
    from faceage.annotate import MIN_FONT_PX
    row = _route_row("POST /annotate")
    assert "width" in row and f"{MIN_FONT_PX} px" in row, row


def test_readyz_replacing_a_pool_whose_idle_worker_died_is_documented():
    """LocatorPool.ready replaces a pool whose worker died while idle; the README named only pools failing their start."""
    from faceage.serving import LocatorPool
    assert "died while idle" in (LocatorPool.ready.__doc__ or "")
    errors = _between(README, "Bad input gets", "Settings (environment")
    assert re.search(r"died while idle[^.]*`/readyz`", errors), "the README does not say /readyz heals an idle pool"


def test_bench_service_clients_minimum_is_the_one_the_script_enforces():
    """bench_service refuses --clients 1 (it overwrote the paired figures): the README says so, and no README
    command passes a count the script refuses."""
    source = (REPO / "benchmarks" / "bench_service.py").read_text()
    minimum = int(re.search(r"args\.clients < (\d+)", source).group(1))
    section = _between(README, "`bench_service.py` serves each bento", "\n\n")
    assert re.search(rf"`--clients`, {minimum} or more", section), "the benchmark section does not give --clients' minimum"
    for clients in re.findall(r"bench_service\.py[^\n`]*--clients (\d+)", README):
        assert int(clients) >= minimum, f"a README command runs bench_service with --clients {clients}"
