"""README claims of round 31's second wave checked against the code they name: the annotation label's format and
legibility constants, the pixel cap's message and setting, the train.pretrained values dlib_age takes, and the
"did you mean" examples.

Reads text files and imports light modules (PIL, numpy, yaml); no ../shared, no model, no BentoML.
"""

import ast
import io
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
FLAT = " ".join(README.split())


def _constants(module: str) -> dict:
    """The module's top-level ``NAME = literal`` assignments, read without importing it."""
    tree = ast.parse((REPO / "faceage" / f"{module}.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return found


def _annotate_row() -> str:
    return next(line for line in README.splitlines() if line.startswith("| `POST /annotate"))


def test_the_annotate_rows_label_format_is_face_labels():
    """annotate.py labels each face "#n age ± std" (n: the tables' face column); the README said "age ± std"."""
    from faceage.annotate import face_label
    from faceage.predict import FaceAge

    label = face_label(FaceAge((0, 0, 10, 10), 34.4, 5.2, 1.0), 3)
    assert label == "#3 34 \u00b1 5", label
    assert '"#n age \u00b1 std" label (n: the face\'s number, the `face` column' in _annotate_row()


def test_the_annotate_rows_font_sizes_are_annotates_constants():
    """The row's 12 px floor, 10 px legibility floor and 400 px shown width are MIN_FONT_PX, LEGIBLE_FONT_PX and
    SHOWN_WIDTH_PX in faceage/annotate.py."""
    c = _constants("annotate")
    row = _annotate_row()
    assert f"down to {c['MIN_FONT_PX']} px" in row, row
    assert (f"not below {c['LEGIBLE_FONT_PX']} px with the photo shown {c['SHOWN_WIDTH_PX']} px wide unless that is "
            "over a twelfth of its short side") in row, row
    assert "round(min(h, w) / 12)" in (REPO / "faceage" / "annotate.py").read_text()  # "a twelfth of its short side"


def test_the_pixel_caps_message_and_setting_are_the_servings():
    """Settings: the quoted 'image too large' message is images.py's, with the default cap and serving.py's
    MAX_PIXELS_SETTING appended."""
    from PIL import Image

    from faceage.images import ImageDecodeError, load_image

    m = re.search(r"`(image too large: (\d+)x(\d+) = (\d+) pixels, the limit is (\d+)) \((\w+)\)`", FLAT)
    assert m, "the README does not quote the pixel cap's message with its setting"
    w, h, pixels, limit = (int(x) for x in m.group(2, 3, 4, 5))
    assert (w * h, pixels > limit) == (pixels, True)
    assert limit == _constants("images")["DEFAULT_MAX_PIXELS"]
    assert m[6] == _constants("serving")["MAX_PIXELS_SETTING"]
    assert f"`{m[6]}` (40 M;" in FLAT
    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, format="PNG")
    with pytest.raises(ImageDecodeError) as e:
        load_image(buf.getvalue(), max_pixels=50)
    assert str(e.value) == "image too large: 10x10 = 100 pixels, the limit is 50"  # the README's form, small


def test_the_pretrained_values_dlib_age_takes_are_the_readmes():
    """load_params: a weights file as train.pretrained for dlib_age is refused; the README names the values it takes."""
    from faceage.config import DLIB_AGE_WEIGHTS, dlib_weights_refusal

    m = re.search(r"or for `dlib_age`, whose weights are dlib's own: `(\w+)` or `(\w+)`, or `(\w+)` for random", FLAT)
    assert m, "the README's dlib_age train.pretrained sentence changed: update this test"
    assert tuple(m.group(1, 2)) == DLIB_AGE_WEIGHTS
    assert all(dlib_weights_refusal("dlib_age", v) is None for v in m.groups())
    assert dlib_weights_refusal("dlib_age", "/abs/weights.pth")


@pytest.mark.parametrize("typed, meant", [("epoch", "epochs"), ("learning_rate", "lr")])
def test_the_did_you_mean_examples_are_config_s(typed, meant):
    """The README's examples of a mistyped key name the key config.did_you_mean finds."""
    from faceage.config import TrainParams, did_you_mean

    keys = [f.name for f in TrainParams.__dataclass_fields__.values()]
    assert did_you_mean(typed, keys, "train.") == f" (did you mean train.{meant}?)"
    assert f"train.{typed} (did you mean train.{meant}?)" in FLAT
