"""torch's OpenMP spin (round 35): importing faceage sets libgomp's spin count before torch loads, unless the user
chose one; and the benchmark that measured it runs and reports ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _env_after_import(**env: str) -> dict[str, str | None]:
    """GOMP_SPINCOUNT and OMP_WAIT_POLICY as a fresh process sees them after `import faceage`."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    clean.update(env, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", "import faceage, os, json; print(json.dumps({k: os.environ.get(k) "
                          "for k in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')}))"], env=clean, capture_output=True,
                         text=True, check=True, cwd="/")
    return json.loads(out.stdout)


def test_importing_faceage_sets_a_short_spin_before_torch_loads():
    import faceage

    assert _env_after_import() == {"GOMP_SPINCOUNT": faceage.OMP_SPIN_COUNT, "OMP_WAIT_POLICY": None}
    assert int(faceage.OMP_SPIN_COUNT) < 300_000  # shorter than libgomp's own default


def test_a_spin_count_or_wait_policy_the_user_set_is_kept():
    assert _env_after_import(GOMP_SPINCOUNT="500") == {"GOMP_SPINCOUNT": "500", "OMP_WAIT_POLICY": None}
    # OMP_WAIT_POLICY decides the spin itself (PASSIVE: none, ACTIVE: for ever): no count is added beside it
    assert _env_after_import(OMP_WAIT_POLICY="ACTIVE") == {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "ACTIVE"}


def test_the_faceage_modules_import_faceage_before_torch():
    """The spin count only acts when set before torch loads libgomp: every stage and the service import faceage
    (whose __init__ sets it) before anything imports torch."""
    code = ("import sys; import faceage.training; "
            "print('torch' in sys.modules)")
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    clean["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=clean, capture_output=True, text=True,
                         check=True, cwd="/")
    order = [line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "faceage" in order and "torch" in order
    # importtime lists a module when its import finishes: faceage's __init__ ran (and finished) before torch started
    assert order.index("faceage") < order.index("torch")


def test_the_benchmark_compares_the_spin_settings_side_by_side(tmp_path):
    pytest.importorskip("torchvision")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_omp_wait
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    if bench_omp_wait.usable_cores() < 2:
        pytest.skip("one usable core: the benchmark has nothing to compare")
    out = tmp_path / "omp.json"
    assert bench_omp_wait.main(["--rounds", "1", "--steps", "1", "--size", "32", "--batch", "2", "--busy", "0",
                                "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    idle = result["idle"]
    assert set(idle["s_per_step"]) == set(bench_omp_wait.POLICIES) == {"default", "passive", "spin10k"}
    assert idle["ratio_to_default"]["default"] == 1.0
    assert all(t > 0 for t in idle["s_per_step"].values())
    assert "busy_1" not in result
