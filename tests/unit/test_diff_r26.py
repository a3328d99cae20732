"""Round 26's final review of the round's diff: what one change left behind another.

Fast, no ../shared: a photo written here, no detector, no model.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from faceage.external import cache_key
from faceage.images import load_image
from tests.unit.test_images_r26 import ADOBE_GAMMA, ADOBE_RGB, _gamma, rgb_profile

# cache_key(Path("set"), {}, "sp", fingerprint="f") at a489baf (round 25, FACES_FORMAT 5), before load_image
# converted ICC-tagged photos to sRGB.
ROUND_25_KEY = "c0107285cc2448b6"


def test_external_crops_cut_before_the_icc_conversion_are_not_reused():
    """abd9bd1 made load_image convert a photo tagged with Adobe RGB (or Display P3, a print or grey profile) to
    sRGB, so preprocess cuts other pixels from it; an external set's crops cached by round 25 (cut from the raw
    values) kept their key, and evaluate scored them beside a model trained on converted crops."""
    tagged = io.BytesIO()
    Image.fromarray(np.tile(np.array([[[200, 60, 40]]], np.uint8), (8, 8, 1))).save(
        tagged, format="PNG", icc_profile=rgb_profile(ADOBE_RGB, _gamma(ADOBE_GAMMA)))
    assert not np.array_equal(load_image(tagged.getvalue())[0, 0], [200, 60, 40])  # the pixels a crop is cut from
    assert cache_key(Path("set"), {}, "sp", fingerprint="f") != ROUND_25_KEY
