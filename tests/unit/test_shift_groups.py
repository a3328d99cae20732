"""The seed summary of ``benchmarks/shift_groups.py`` (the unseen-group check that keeps the descriptor the default)."""

from benchmarks.shift_groups import HeldOut, summary


def test_summary_gives_each_gap_mean_and_worst_seed_per_variant_and_group():
    rows = [HeldOut("fused", "male", 42, 0.10, -0.04, 0.18), HeldOut("fused", "female", 42, -0.92, -1.02, -0.81),
            HeldOut("fused", "male", 1, -0.10, -0.20, 0.02), HeldOut("fused", "female", 1, -1.00, -0.64, -0.70),
            HeldOut("fused-drop", "male", 42, 0.62, 0.47, 0.64)]
    lines = summary(rows).splitlines()
    assert lines[0].startswith("| variant | held out | seeds |") and len(lines) == 2 + 3
    assert lines[2] == "| fused | male | 2 | +0.00 (+0.10) | -0.12 (-0.04) | +0.10 (+0.18) |"
    assert lines[3] == "| fused | female | 2 | -0.96 (-0.92) | -0.83 (-0.64) | -0.76 (-0.70) |"
    assert lines[4] == "| fused-drop | male | 1 | +0.62 (+0.62) | +0.47 (+0.47) | +0.64 (+0.64) |"
