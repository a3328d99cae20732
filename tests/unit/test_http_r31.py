"""Round-31 review of the service's shutdown and HTTP plumbing (faceage/serving.py, faceage/http.py, service.py).

``bentoml serve`` stopped with SIGTERM or Ctrl-C printed "resource_tracker: There appear to be 5 leaked semaphore
objects to clean up at shutdown": uvicorn runs the service's shutdown hook, then raises the signal again on its own
process, which dies without running ``atexit`` or the garbage collector; the detection pool's queues (and their named
POSIX semaphores in ``/dev/shm``) were still held by the executor's manager thread, which ``shutdown(wait=False)``
left running. Here a real :class:`LocatorPool` with a real spawned worker does the same in a child process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent("""
    import asyncio, io, os, signal, sys
    import numpy as np
    from PIL import Image
    from faceage.predict import FaceLocator
    from faceage.serving import LocatorPool

    def main():
        locator = FaceLocator(sys.argv[1], kind="hog", upsample=0, margin=0.4, crop_size=32)
        buf = io.BytesIO()
        Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(buf, "PNG")

        async def serve():
            pool = LocatorPool(locator, 1)
            located, _ = await pool.locate(buf.getvalue())  # the worker is up and has answered a photo
            assert located.boxes == [], located
            pool.close()  # what the service's shutdown hook runs
        asyncio.run(serve())
        print("closed", flush=True)
        signal.raise_signal(signal.SIGTERM)  # as uvicorn does once its shutdown hooks are done

    if __name__ == "__main__":
        main()
""")


def test_a_server_killed_by_its_signal_after_closing_the_pool_leaks_no_semaphore(hog_detector_dir, tmp_path):
    script = tmp_path / "serve_and_stop.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(script), str(hog_detector_dir)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert "closed" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]
    assert "leaked semaphore" not in proc.stderr, proc.stderr[-3000:]


def test_several_photos_on_a_one_photo_route_point_to_predict_batch():
    """``curl -F image=@a.jpg -F image=@b.jpg /predict`` answered "too many images: 2, at most 1 per request",
    which does not say where several photos go."""
    import pytest

    from faceage.http import BadRequest, Part, image_parts

    two = [Part("image", f"{n}.jpg", "image/jpeg", b"x") for n in "ab"]
    with pytest.raises(BadRequest) as e:
        image_parts(two, 1)
    assert e.value.status == 400 and "/predict_batch" in e.value.message and "2" in e.value.message
    with pytest.raises(BadRequest) as e:  # the batch route's own cap keeps its message
        image_parts(two * 9, 16)
    assert e.value.message == "too many images: 18, at most 16 per request"


def test_detection_workers_outlive_the_signal_that_stops_the_server_until_the_pool_closes(hog_detector_dir):
    """Ctrl-C in ``bentoml serve`` (or ``kill -- -PGID``) signals the whole process group: the detection workers
    died at once, so the photos still in flight, which uvicorn's graceful shutdown waits for, got a 503 "the
    detection workers did not start (A process in the process pool was terminated abruptly ...)", and a new pool
    was spawned while the server shut down. The workers now leave the signal to the server: they end when the pool
    closes (or when the server process is gone)."""
    import asyncio
    import io
    import time

    import numpy as np
    from PIL import Image

    from faceage.predict import FaceLocator
    from faceage.serving import LocatorPool

    locator = FaceLocator(hog_detector_dir, kind="hog", upsample=0, margin=0.4, crop_size=32)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(buf, "PNG")

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"

    async def scenario():
        pool = LocatorPool(locator, 2)
        try:
            await pool._started(pool._workers)
            workers = pool._workers
            pids = [p.pid for p in workers.executor._processes.values()]
            for pid in pids:
                os.kill(pid, signal.SIGINT)
                os.kill(pid, signal.SIGTERM)
            await asyncio.sleep(1.0)
            assert all(alive(pid) for pid in pids), "a detection worker died of the server's stop signal"
            located, _ = await pool.locate(buf.getvalue())
            assert located.boxes == [] and pool._workers is workers  # answered by the same pool, not a new one
        finally:
            await asyncio.to_thread(pool.close)
        return pids

    pids = asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids), "close() left a detection worker running"
