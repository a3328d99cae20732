"""Round-30 review of the decode path, annotation and the split HOG detector, on real photos."""

from __future__ import annotations

import numpy as np
import pytest

from faceage.annotate import face_label
from faceage.predict import FaceAge


def _face(age: float, std: float) -> FaceAge:
    return FaceAge(box=(0, 0, 10, 10), age=age, age_std=std, score=1.0)


@pytest.mark.parametrize("age, std, label", [
    (34.5, 2.5, "35 \u00b1 3"),  # exact halves: Python's format rounds them to even (34, 2)
    (35.5, 3.5, "36 \u00b1 4"),
    (0.5, 0.5, "1 \u00b1 1"),
    (2.5, 1.5, "3 \u00b1 2"),
    (34.46, 5.55, "34 \u00b1 6"),  # the value is rounded, not its one-decimal figure (34.5): no double rounding
    (34.4, 5.6, "34 \u00b1 6"),
    (-0.2, 0.0, "0 \u00b1 0"),  # never "-0"
])
def test_the_label_rounds_exact_halves_up(age, std, label):
    """The UI's table shows round(age, 1) = 34.5 beside the label (the CLI's table f"{age:.1f}"): it said "34",
    and 35.5 "36", 2.5 "2" (``.0f`` rounds halves to even); a reader rounds 34.5 to 35."""
    assert face_label(_face(age, std)) == label


def test_a_real_photo_stored_turned_by_exif_orientation_6_decodes_as_the_upright_original(wild_dir):
    """Guard (passes before and after this round): the derived EXIF-6 copy of a real two-person photo decodes
    to the original's shape and pixels, within its JPEG re-encoding (not turned the other way, not mirrored)."""
    from faceage.images import load_image

    turned = load_image(wild_dir / "derived_exif6_two_people.jpg").astype(int)
    original = load_image(wild_dir / "fr_two_people.jpg").astype(int)
    assert turned.shape == original.shape == (661, 1126, 3)
    assert np.abs(turned - original).mean() < 3  # 1.7 measured; a mirrored or 180-degree copy is far off
    assert np.abs(turned - original[:, ::-1]).mean() > 10 and np.abs(turned - original[::-1, ::-1]).mean() > 10


def test_an_eps_file_is_refused_before_any_program_runs(monkeypatch):
    """Pillow opens EPS by running Ghostscript (``gs``) on the file: the service would run a PostScript interpreter
    on an upload wherever Ghostscript is installed. EPS is no photo format: refused as an unknown format."""
    import subprocess

    from faceage.images import ImageDecodeError, _safe_formats, load_image

    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
           b"0 0 moveto 8 0 lineto 8 8 lineto closepath fill\nshowpage\n%%EOF\n")
    ran = []
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: ran.append(a))
    assert "EPS" not in _safe_formats()
    with pytest.raises(ImageDecodeError, match=r"^not an image \(unknown format\)"):
        load_image(eps)
    assert ran == []
