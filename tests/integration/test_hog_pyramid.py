"""On the shared real photos, detection on two threads finds exactly the faces dlib finds on one.

Every decodable ``wild`` photo (groups of up to 24, 20 MP downscaled as the service does, odd
formats) and every 8th face of the sample and of utk-external go through the service's locator
(:class:`faceage.predict.FaceLocator`: downscale, first look, second look) both ways; boxes and
scores must be identical. Skips without ../shared.
"""

from __future__ import annotations

import pytest

from faceage.images import ImageDecodeError, load_image
from faceage.predict import FaceLocator

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def locator(detector_dir):
    # the pipeline's settings: HOG, upsample 1, the second look at 0.35
    return FaceLocator(detector_dir, kind="hog", upsample=1, retry_pad=0.35, margin=0.4, crop_size=224)


def photos(wild_dir, sample_dir, external_dir):
    wild = sorted(p for p in wild_dir.iterdir() if p.name != "labels.csv" and not p.name.startswith("README"))
    faces = sorted((sample_dir / "test").glob("*.jpg"))[::8] + sorted((external_dir / "test").glob("*.jpg"))[::8]
    return wild, [p for p in faces if not p.name.endswith("_face.jpg")]


def test_two_threads_find_the_same_faces_on_real_photos(locator, wild_dir, sample_dir, external_dir):
    wild, faces = photos(wild_dir, sample_dir, external_dir)
    compared, found = 0, 0
    for path in wild + faces:
        try:
            image = load_image(path, max_pixels=locator.max_pixels)
        except (ImageDecodeError, OSError):
            continue  # the not-an-image, empty and truncated files
        one = locator.detect(image)
        two = locator.detect(image, parallel=True)
        assert two == one, f"{path.name}: {two} != {one}"
        compared += 1
        found += len(one)
    assert compared >= 48 + 100 and found >= compared  # the wild groups hold more faces than photos
