"""Crop geometry (image borders, padding, scale) and detection on a real public-domain face."""

import numpy as np
import pytest

from faceage.faces import FaceBox, FaceDetector, choose_subject, crop_box, crop_face, margin_region, whole_image_box


def gradient_image(h=100, w=160):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x % 256, y % 256, (x + y) % 256], axis=2).astype(np.uint8)


def test_crop_box_is_square_centred_with_margin():
    box = FaceBox(40, 20, 80, 60, 1.0)  # 40x40
    x0, y0, x1, y1 = crop_box(box, 0.5)
    assert (x1 - x0, y1 - y0) == (80, 80)
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == (60, 40)


def test_crop_without_margin_equals_box_pixels():
    img = gradient_image()
    box = FaceBox(30, 10, 70, 50, 1.0)
    crop = crop_face(img, box, 0.0, 40)
    assert crop.shape == (40, 40, 3)
    np.testing.assert_array_equal(crop, img[10:50, 30:70])


def test_crop_at_top_left_border_pads_black_and_keeps_position():
    img = np.full((100, 100, 3), 200, dtype=np.uint8)
    box = FaceBox(0, 0, 20, 20, 1.0)  # at the corner; margin 0.5 -> 40 px square from (-10, -10)
    crop = crop_face(img, box, 0.5, 40)
    assert crop.shape == (40, 40, 3)
    assert (crop[:8, :8] == 0).all(), "outside the image must be black padding"
    assert (crop[12:, 12:] == 200).all(), "inside the image must be image pixels"


def test_crop_at_bottom_right_border_pads():
    img = np.full((50, 60, 3), 255, dtype=np.uint8)
    box = FaceBox(40, 30, 60, 50, 1.0)
    crop = crop_face(img, box, 0.4, 28)  # 20 px box -> 28 px crop, 4 px past the right/bottom edges
    assert crop.shape == (28, 28, 3)
    assert (crop[-3:, :] == 0).all() and (crop[:, -3:] == 0).all()
    assert (crop[:20, :20] == 255).all()


def test_crop_entirely_outside_is_black():
    img = np.full((10, 10, 3), 255, dtype=np.uint8)
    crop = crop_face(img, FaceBox(100, 100, 120, 120, 1.0), 0.0, 8)
    assert crop.shape == (8, 8, 3) and crop.max() == 0


def test_whole_image_box_pads_to_square():
    img = np.full((20, 40, 3), 255, dtype=np.uint8)
    crop = crop_face(img, whole_image_box(img), 0.0, 40)
    assert (crop[:9] == 0).all() and (crop[-9:] == 0).all() and (crop[11:29] == 255).all()


def test_the_whole_image_fallback_of_a_panorama_needs_no_square_of_its_longer_side():
    """Padding first made the square of the longer side: a 300 x 12000 photo took 412 MB for one crop."""
    import tracemalloc

    from faceage.faces import WHOLE_IMAGE_SIDE, whole_image_region

    small = np.full((20, 40, 3), 255, dtype=np.uint8)
    assert np.array_equal(whole_image_region(small), margin_region(small, whole_image_box(small), 0.0))  # unchanged
    panorama = np.full((300, 12000, 3), 200, dtype=np.uint8)
    tracemalloc.start()
    region = whole_image_region(panorama)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert region.shape == (WHOLE_IMAGE_SIDE, WHOLE_IMAGE_SIDE, 3) and peak < 40e6
    band = WHOLE_IMAGE_SIDE * 300 / 12000  # the photo, centred, between black bands
    middle = WHOLE_IMAGE_SIDE // 2
    assert (region[middle, :] == 200).all() and (region[: int(middle - band / 2) - 1] == 0).all()


@pytest.mark.parametrize("margin", [-0.1, 2.0])
def test_bad_margin_is_rejected(margin):
    with pytest.raises(ValueError, match="margin must be in"):
        crop_box(FaceBox(0, 0, 10, 10, 1.0), margin)


def test_choose_subject_prefers_largest_then_central():
    small = FaceBox(0, 0, 10, 10, 2.0)
    big_edge = FaceBox(0, 50, 30, 80, 0.5)
    big_centre = FaceBox(35, 35, 65, 65, 0.5)
    assert choose_subject([small, big_edge, big_centre], 100, 100) == big_centre
    assert choose_subject([small], 100, 100) == small
    assert choose_subject([], 100, 100) is None


def test_hog_finds_the_astronauts_face(detector_dir):
    from skimage.data import astronaut  # public domain (NASA), ships with scikit-image

    boxes = FaceDetector(detector_dir, "hog", 1).detect(astronaut())
    assert len(boxes) >= 1
    face = boxes[0]
    # Eileen Collins' face is near (215, 120) in the 512x512 image.
    assert 170 <= (face.left + face.right) / 2 <= 260 and 80 <= (face.top + face.bottom) / 2 <= 170
    crop = crop_face(astronaut(), face, 0.4, 96)
    assert crop.shape == (96, 96, 3) and crop.std() > 10


def test_no_face_in_noise(detector_dir):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    assert FaceDetector(detector_dir, "hog", 0).detect(noise) == []
    assert FaceDetector(detector_dir, "hog", 1, retry_pad=0.35).detect(noise) == []  # the second look finds none either


def test_retry_pad_finds_a_face_that_fills_the_frame(detector_dir):
    """A tight crop of the astronaut's face (10% inside the detected box): HOG alone finds nothing;
    the second look on the bordered image finds it, in the crop's own coordinates, at any size."""
    from PIL import Image
    from skimage.data import astronaut

    image = astronaut()
    face = FaceDetector(detector_dir, "hog", 1).detect(image)[0]
    inset = int(0.1 * face.width)
    tight = np.ascontiguousarray(image[face.top + inset:face.bottom - inset, face.left + inset:face.right - inset])
    h, w = tight.shape[:2]
    assert FaceDetector(detector_dir, "hog", 1).detect(tight) == []
    retry = FaceDetector(detector_dir, "hog", 1, retry_pad=0.35)
    (box,) = retry.detect(tight)
    assert 0 <= box.left < box.right <= w and 0 <= box.top < box.bottom <= h  # clipped to the unbordered crop
    assert box.width >= 0.8 * w and box.height >= 0.8 * h  # the face fills the frame
    # the same headshot at 8x the pixels: the same box, scaled (the second look works on a fixed-size copy)
    big = np.asarray(Image.fromarray(tight).resize((w * 8, h * 8), Image.Resampling.BICUBIC))
    (big_box,) = retry.detect(big)
    for a, b in zip(big_box.as_list(), box.as_list()):
        assert abs(a - 8 * b) <= 0.1 * 8 * w
    # a photo where the first look finds the face is untouched by the setting
    assert retry.detect(image) == FaceDetector(detector_dir, "hog", 1).detect(image)


def test_the_cnn_look_finds_a_face_both_hog_looks_miss(detector_dir):
    """skimage's cameraman (public domain), whose face both HOG looks miss: the CNN detector's last look
    finds it on the image scaled to cnn_retry_side, mapped back to the photo's own coordinates at any size;
    it finds nothing in noise, and a photo where HOG finds the face is untouched by the setting."""
    from PIL import Image
    from skimage.data import astronaut, camera

    image = np.repeat(camera()[:, :, None], 3, axis=2)  # 512 x 512
    assert FaceDetector(detector_dir, "hog", 1, retry_pad=0.35).detect(image) == []
    looking = FaceDetector(detector_dir, "hog", 1, retry_pad=0.35, cnn_retry_side=512)
    (box,) = looking.detect(image)
    assert 150 <= (box.left + box.right) / 2 <= 290 and 90 <= (box.top + box.bottom) / 2 <= 220  # his face
    assert 50 <= box.width <= 130
    # At 400 px the face is ~60 px, below what the CNN sees without upsampling: the side bounds the look.
    assert FaceDetector(detector_dir, "hog", 1, retry_pad=0.35, cnn_retry_side=400).detect(image) == []
    big = np.asarray(Image.fromarray(image).resize((1024, 1024), Image.Resampling.BICUBIC))
    (big_box,) = looking.detect(big)  # the look runs on a copy scaled down to 512: the same face, scaled
    for a, b in zip(big_box.as_list(), box.as_list()):
        assert abs(a - 2 * b) <= 12
    noise = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    assert looking.detect(noise) == []
    assert looking.detect(astronaut()) == FaceDetector(detector_dir, "hog", 1).detect(astronaut())
    with pytest.raises(ValueError, match="cnn_retry_side must be >= 0"):
        FaceDetector(detector_dir, "hog", 1, cnn_retry_side=-1)


@pytest.mark.parametrize("pad", [-0.1, 1.5])
def test_bad_retry_pad_is_rejected(detector_dir, pad):
    with pytest.raises(ValueError, match="retry_pad must be in"):
        FaceDetector(detector_dir, "hog", 1, retry_pad=pad)


def test_detector_rejects_unknown_kind(detector_dir):
    with pytest.raises(ValueError, match="'hog' or 'cnn'"):
        FaceDetector(detector_dir, "haar")


def test_detector_manifest_checksums(detector_dir):
    from faceage.detector import MODEL_SHA256, read_manifest

    manifest = read_manifest(detector_dir, verify=True)
    for name, sha in MODEL_SHA256.items():
        assert manifest["files"][name] == sha


def test_warm_up_runs_the_cnn_look_only_where_there_is_one(detector_dir, monkeypatch):
    looks = []
    with_look = FaceDetector(detector_dir, "hog", 1, cnn_retry_side=120)
    original = with_look._detect
    monkeypatch.setattr(with_look, "_detect", lambda image, *a, **k: looks.append((image.shape, k)) or original(image, *a, **k))
    with_look.warm_up()
    assert looks == [((120, 120, 3), {"kind": "cnn"})]
    FaceDetector(detector_dir, "hog", 1).warm_up()  # no look, no model to run: nothing happens


def test_images_too_small_for_the_cnn_get_no_face_and_leave_it_working(detector_dir):
    """A 1 x 1 spacer GIF, a 9 x 9 icon, a 6000 x 100 banner (400 x 7 when scaled for the CNN's look):
    dlib's CNN raised on them (HTTP 500 in the service, a crashed `faceage predict` run), and its heap was
    corrupt afterwards (a later call or the process exit crashed). Run in a child process, which that
    corruption would crash."""
    import subprocess
    import sys

    code = f"""
import numpy as np
from skimage.data import astronaut
from faceage.faces import FaceDetector
for kind, upsample, side in (("hog", 1, 400), ("cnn", 0, 0)):
    d = FaceDetector({str(detector_dir)!r}, kind, upsample, retry_pad=0.35, cnn_retry_side=side)
    for h, w in ((1, 1), (9, 9), (3, 40), (100, 6000), (7, 400), (400, 9)):
        assert d.detect(np.full((h, w, 3), 128, np.uint8)) == [], (kind, h, w)
    print(kind, len(d.detect(astronaut())))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = dict(zip(*[iter(done.stdout.split())] * 2))
    assert set(found) == {"hog", "cnn"} and all(int(n) >= 1 for n in found.values())  # the astronaut's face


def test_the_second_look_at_a_thin_image_needs_no_more_memory_than_a_square_one(detector_dir):
    """The second look bordered the full image by 0.35 x its longer side before scaling it down: a
    20000 x 400 PNG of 9 kB, under the pixel cap, took 3.6 GB in a service worker. It now scales first."""
    import tracemalloc

    retry = FaceDetector(detector_dir, "hog", 0, retry_pad=0.35)
    thin = np.full((100, 8000, 3), 128, np.uint8)  # 2.4 MB; bordered first, 232 MB
    tracemalloc.start()
    try:
        assert retry.detect(thin) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20e6, f"peak {peak / 1e6:.0f} MB"


def test_a_release_crop_is_framed_as_the_margin_frames_detected_faces():
    """The release crop (the face with 40% margin) was used as it is at any preprocess.margin, while the
    chips' landmark fit placed the face by preprocess.margin: at 0.2 it looked for the face in the wrong box."""
    from faceage.faces import release_crop_region

    crop = np.zeros((180, 180, 3), np.uint8)
    crop[50:130, 50:130] = 255  # something in the middle of a 180 px crop: its face box is the central 100 px
    assert np.array_equal(release_crop_region(crop, 0.4), crop)  # at the release's own margin: as it is
    tight = release_crop_region(crop, 0.2)
    assert tight.shape == (140, 140, 3)  # the face box (100 px) with 20% on each side
    assert np.array_equal(tight, crop[20:160, 20:160])
    wide = release_crop_region(crop, 0.6)
    assert wide.shape == (220, 220, 3) and np.array_equal(wide[20:200, 20:200], crop) and wide[:20].max() == 0


def test_the_cnn_detector_looks_at_a_large_photo_scaled_to_its_pixel_cap(detector_dir, monkeypatch):
    """dlib's CNN holds ~1 KB per pixel it looks at: a 1080p photo at upsample 1 took 8.1 GB. A photo over
    CNN_MAX_PIXELS (after upsampling) is scaled down first; its face is found, in the photo's own coordinates."""
    from PIL import Image
    from skimage.data import astronaut

    from faceage.faces import CNN_MAX_PIXELS

    small = astronaut()  # 512 x 512: 1 MP at upsample 1, under the cap
    big = np.asarray(Image.fromarray(small).resize((1536, 1536), Image.Resampling.BICUBIC))  # 9.4 MP at upsample 1
    detector = FaceDetector(detector_dir, "cnn", 1)
    seen = []
    original = detector._detect
    monkeypatch.setattr(detector, "_detect", lambda image, *a, **k: seen.append(image.shape) or original(image, *a, **k))
    (box,) = detector.detect(small)
    (big_box,) = detector.detect(big)
    assert seen[0] == small.shape  # under the cap: the photo itself
    assert seen[1][0] * seen[1][1] * 4 <= CNN_MAX_PIXELS < big.shape[0] * big.shape[1] * 4
    for a, b in zip(big_box.as_list()[:4], box.as_list()[:4]):
        assert abs(a - 3 * b) <= 0.1 * 3 * box.width  # the same face, in the big photo's coordinates


def test_subject_order_breaks_a_size_and_centre_tie_by_score_whatever_the_given_order():
    """Two faces of one size, mirror images about the centre: the higher score comes first, given either way
    (the downscaled detection path no longer pre-sorts by score before subject_order)."""
    from faceage.faces import subject_order

    left, right = FaceBox(10, 40, 30, 60, 0.2), FaceBox(70, 40, 90, 60, 0.9)
    assert subject_order([left, right], 100, 100) == [right, left]
    assert subject_order([right, left], 100, 100) == [right, left]


def test_a_child_forked_while_another_thread_detects_can_detect(detector_dir):
    """A fork copies the detector's lock as it is: held by the parent's detecting thread, the child's first
    detect waited for ever. The child must find the astronaut's face on its own."""
    import multiprocessing as mp

    from skimage.data import astronaut

    detector = FaceDetector(detector_dir, "hog", 0)
    image = astronaut()
    expected = detector.detect(image)
    assert len(expected) == 1
    found = mp.get_context("fork").Queue()

    def child():
        found.put(detector.detect(image))

    with detector._lock:  # as a parent thread mid-detect holds it at the moment of the fork
        process = mp.get_context("fork").Process(target=child, daemon=True)
        process.start()
    process.join(60)
    alive = process.is_alive()
    if alive:
        process.kill()
    assert not alive, "the forked child never returned from detect: it waits on the parent's lock"
    assert process.exitcode == 0
    assert found.get(timeout=10) == expected
