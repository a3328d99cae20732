"""The side-by-side ratios of ``benchmarks/bench_service.py`` (issue 7's one-face latency ratio)."""

import pytest

from benchmarks.bench_service import ratios


def run(target: str, one_face: float | None, p50: float, img_s: float) -> dict:
    return {"target": target, "one_face_p50_ms": one_face, "service_1": {"p50_ms": p50},
            "service_8": {"images_per_s": img_s}}


def test_each_later_run_is_divided_by_the_first():
    runs = [run("host a", 400.0, 480.0, 2.0), run("host b", 250.0, 260.0, 3.5), run("host c", 200.0, 240.0, 4.0)]
    out = ratios(runs, 8)
    assert [q["target"] for q in out] == ["host b", "host c"]
    assert all(q["versus"] == "host a" for q in out)
    assert out[0]["one_face_p50"] == pytest.approx(0.625)
    assert out[0]["service_1_p50"] == pytest.approx(260 / 480)
    assert out[0]["service_8_images_per_s"] == pytest.approx(1.75)
    assert out[1]["one_face_p50"] == pytest.approx(0.5)


def test_a_missing_one_face_figure_gives_no_ratio():
    out = ratios([run("host a", None, 480.0, 2.0), run("host b", 250.0, 260.0, 3.5)], 8)
    assert out[0]["one_face_p50"] is None
    assert out[0]["service_1_p50"] == pytest.approx(260 / 480)


def test_one_run_has_nothing_to_compare():
    assert ratios([run("host a", 400.0, 480.0, 2.0)], 8) == []
