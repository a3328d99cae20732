"""Round 33, second read of the PNG colour chunks: a video frame ffmpeg wrote.

ffmpeg tags a PNG frame of BT.709-family video (H.273 transfer 1, 6, 14 or 15: every phone and camera clip) with
cHRM and gAMA 1/1.961 (50994, its approximation of that curve); newer versions (2023 on) add cICP (1, 1). The cICP
frame is decoded as sRGB (BT.709's curve with sRGB's primaries is taken as sRGB's, as for an untagged video frame),
but the same frame from an older ffmpeg (no cICP) was decoded as gamma 1.961: a mid grey 11 levels lighter, and
lighter than before round 33, which used the values as they are. And a cHRM whose red lies on the spectral locus
(BT.2020's, which ffmpeg writes for BT.2020 frames) was refused as naming no colour space.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from faceage.images import load_image
from tests.unit.test_images_r31 import BT709, BT2020, photo, warnings_of
from tests.unit.test_images_r33 import _assert_close, _chrm, _chunk, _cicp, _png, _srgb_from

FFMPEG_BT709_GAMA = _chunk(b"gAMA", (50994).to_bytes(4, "big"))  # ffmpeg's lrint(100000 / 1.961)


@pytest.mark.parametrize("chunks", [[_chrm(BT709), FFMPEG_BT709_GAMA], [FFMPEG_BT709_GAMA]],
                         ids=["chrm-and-gama", "gama-alone"])
def test_an_ffmpeg_frame_of_bt709_video_is_decoded_as_the_same_frame_tagged_by_cicp(chunks, caplog):
    arr = photo()
    tagged_by_cicp = load_image(_png(arr, _cicp(1, 1), _chrm(BT709), FFMPEG_BT709_GAMA))  # newer ffmpeg
    assert np.array_equal(tagged_by_cicp, arr)
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        assert np.array_equal(load_image(_png(arr, *chunks)), arr)  # older ffmpeg
    assert not warnings_of(caplog)


def test_an_ffmpeg_grey_frame_of_bt709_video_keeps_its_values():
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    out = load_image(_png(ramp, FFMPEG_BT709_GAMA))
    assert np.array_equal(out, np.repeat(ramp[..., None], 3, axis=2))


def test_an_ffmpeg_frame_with_bt2020_primaries_is_decoded_as_cicp_says_for_it():
    """Other primaries: BT.709's camera curve, as the cICP (9, 1) that newer ffmpeg writes for it says."""
    arr = photo()
    by_cicp = load_image(_png(arr, _cicp(9, 1)))
    by_chunks = load_image(_png(arr, _chrm(BT2020), FFMPEG_BT709_GAMA))
    assert np.abs(by_cicp.astype(int) - arr).max() > 15  # converted
    assert np.abs(by_chunks.astype(int) - by_cicp).max() <= 1


def test_gamma_2_0_is_still_decoded_by_its_gamma():
    """Only ffmpeg's own value is taken for the video curve: gAMA 50000 (gamma 2.0) is not."""
    arr = photo()
    want = _srgb_from(arr, BT709, lambda v: v ** 2.0)
    assert np.abs(want - arr).max() > 5
    _assert_close(load_image(_png(arr, _chunk(b"gAMA", (50000).to_bytes(4, "big")))), want)


@pytest.mark.parametrize("primaries", [BT2020, ((0.7347, 0.2653), (0.1596, 0.8404), (0.0366, 0.0001))],
                         ids=["bt2020", "prophoto"])
def test_a_chrm_whose_red_lies_on_the_spectral_locus_is_converted(primaries, caplog):
    """BT.2020's red (0.708, 0.292) and ProPhoto's (0.7347, 0.2653) have x + y = 1 (no Z): a colour, not nonsense.
    Such a cHRM (ffmpeg writes one for every BT.2020 frame) was ignored with a warning that it "names no colour
    space" (ProPhoto's primaries with D65's white here: the expected colours need no white adaptation)."""
    arr = photo()
    want = _srgb_from(arr, primaries, lambda v: v)
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(_png(arr, _chrm(primaries), _chunk(b"gAMA", (100000).to_bytes(4, "big"))))
    assert not warnings_of(caplog)
    _assert_close(out, want)
