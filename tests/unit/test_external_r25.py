"""What a crop worker's death in evaluate's external-set cropping tells the user to change."""

import pytest

import faceage.preprocess as preprocess
from faceage.chips import WorkerDiedError
from faceage.external import EXTERNAL_WORKERS, external_faces
from faceage.sources import resolve_external
from tests.unit.test_external import checkpoint_crop, make_set, noise


def test_a_worker_death_while_cropping_an_external_set_names_what_evaluate_reads(detector_dir, tmp_path, monkeypatch):
    """evaluate crops external sets on every core and reads no preprocess.workers, yet a worker killed for lack of
    memory said "lower preprocess.workers": changing it did nothing here, and reran preprocess."""
    def died(fn, items, workers, initializer, initargs, *, desc, unit, workers_key):
        raise WorkerDiedError(f"a crop worker process died ({workers} workers): ...; lower {workers_key}")

    monkeypatch.setattr(preprocess, "map_in_processes", died)
    folder = make_set(tmp_path / "set", {"a.jpg": noise(), "b.jpg": noise()})
    [ext] = resolve_external([str(folder)], tmp_path)
    with pytest.raises(WorkerDiedError) as died_error:
        external_faces(ext, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=2)
    message = str(died_error.value)
    assert "preprocess.workers" not in message and message.endswith(f"lower {EXTERNAL_WORKERS}")
    assert "taskset" in EXTERNAL_WORKERS
