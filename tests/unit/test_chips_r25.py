"""How many processes the crop-file map runs on, as embed's log states it."""

from faceage.chips import IN_PROCESS_BELOW, crop_workers
from faceage.cores import usable_cores


def test_the_worker_count_logged_is_the_one_the_map_runs_on():
    """embed logged "on 2 worker(s)" for 9 crops, which the map runs in its own process."""
    assert crop_workers(9) == 1 and crop_workers(IN_PROCESS_BELOW - 1, 4) == 1
    assert crop_workers(IN_PROCESS_BELOW, 3) == 3 and crop_workers(500) == usable_cores()
