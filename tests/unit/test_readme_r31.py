"""README claims checked against the code (round 31's docs review): the status of an empty POST without a
Content-Type, what BentoML's request counter sees of the body cap, the desktop files a source's fingerprint leaves
out, the source URL schemes, the shutdown grace of the detection workers and the bento lineage's DVC fields.

Reads text files and imports light modules (faceage.http imports BentoML's exceptions: a few seconds); no
../shared, no model.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _flat(text: str) -> str:
    return " ".join(text.split())


FLAT = _flat(README)


def _error_paragraph() -> str:
    start = FLAT.index("Bad input gets")
    return FLAT[start:FLAT.index("Uploads stay in memory", start)]


def test_an_empty_post_without_content_type_is_the_415_the_readme_says():
    """The README said '400 for an empty body': an empty POST without a Content-Type gets 415, and only an empty
    multipart/form-data body gets 400."""
    from faceage.http import BadRequest, parse_form

    with pytest.raises(BadRequest) as untyped:
        parse_form(b"", None)
    with pytest.raises(BadRequest) as typed:
        parse_form(b"", "multipart/form-data; boundary=x")
    assert (untyped.value.status, typed.value.status) == (415, 400)
    errors = _error_paragraph()
    assert "400 for an empty `multipart/form-data` body" in errors, errors[:300]
    assert re.search(r"415 for a request that is not `multipart/form-data` \(an empty POST without a Content-Type",
                     errors), errors


def test_the_readme_says_bentomls_request_counter_counts_the_body_caps_answers():
    """BentoML's metrics middleware is outside the service's: bentoml_service_request_total sees the body cap's
    413s (faceage/http.py says so); the README said it did not."""
    assert "``bentoml_service_request_total`` counts these answers" in _flat((REPO / "faceage" / "http.py").read_text())
    row = next(line for line in README.splitlines() if "faceage_rejected_requests_total" in line)
    assert "does not see" not in row, row
    assert "`bentoml_service_request_total` counts them too" in row, row


def test_the_desktop_files_the_readme_says_a_fingerprint_leaves_out_are_left_out(tmp_path):
    """check_sources row: '`.DS_Store`, `._*`, `Thumbs.db` and `desktop.ini` are left out'."""
    from faceage.appa_real import dataset_fingerprint, is_system_file

    m = re.search(r"(`\.DS_Store`, `\._\*`, `Thumbs\.db` and `desktop\.ini`) are left out", FLAT)
    assert m, "the check_sources row's desktop-file sentence changed: update this test"
    named = [n.replace("*", "x") for n in re.findall(r"`([^`]+)`", m[1])]
    assert all(is_system_file(n) for n in named), named
    (tmp_path / "a.jpg").write_bytes(b"photo")
    before = dataset_fingerprint(tmp_path)
    for name in named:
        (tmp_path / name).write_bytes(b"written by the desktop")
    assert dataset_fingerprint(tmp_path) == before


def test_the_source_url_schemes_are_the_readmes(tmp_path):
    """fetch_data row: a `file:///abs/path` URL is the path; `ftp://`, `s3://` are refused."""
    from faceage.appa_real import LayoutError, local_source

    assert "also as a `file:///abs/path` URL; other schemes, `ftp://`, `s3://`, are refused" in FLAT
    assert local_source(tmp_path.as_uri()) == tmp_path
    for url in ("ftp://host/appa.zip", "s3://bucket/appa.zip"):
        with pytest.raises(LayoutError, match="not fetched"):
            local_source(url)


def test_the_detection_workers_shutdown_grace_is_the_readmes():
    """Serving: 'any still busy 10 s later are killed' is serving.CLOSE_TIMEOUT_S (read without importing it)."""
    tree = ast.parse((REPO / "faceage" / "serving.py").read_text())
    value = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CLOSE_TIMEOUT_S" for t in node.targets))
    m = re.search(r"any still busy (\d+) s later are killed", FLAT)
    assert m, "the README's shutdown sentence changed: update this test"
    assert float(m[1]) == value


@pytest.mark.parametrize("key", ["dvc_experiment", "dvc_evaluated_in"])
def test_the_lineage_fields_packaging_writes_are_in_the_readmes_list(key):
    """The bento lineage (faceage.json) names the DVC experiment a champion trained in; the README's list did not."""
    assert f'"{key}"' in (REPO / "faceage" / "packaging.py").read_text()
    start = FLAT.index("`faceage.json`, the lineage")
    assert f"`{key}`" in FLAT[start:start + 2000]
