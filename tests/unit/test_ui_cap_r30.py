"""Round-30: a total cap on what the UI's uploads hold in Gradio's cache (``GRADIO_TEMP_DIR``, RAM), and
the age of an upload as Gradio's ``delete_cache`` really gives it.

The per-request cap (``FACEAGE_MAX_BODY_BYTES``) and the UI's share of concurrent requests left the total
unbounded: uploads stay 10-15 minutes, so a steady stream of different photos filled ``/dev/shm``.
:class:`faceage.ui.UIGateMiddleware` now refuses an upload (429, ``Retry-After``) that would take the cache
past ``FACEAGE_UI_UPLOAD_CACHE_BYTES``, counting the folder at most once a second.
"""

from __future__ import annotations

import asyncio

import pytest

import faceage.ui
from faceage.http import Limits
from faceage.ui import LazyUI, UIGateMiddleware

UPLOAD = "/ui/gradio_api/upload"


async def _call(app, path: str, method: str = "POST", length: int = 1000):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-length", str(length).encode())]}
    await app(scope, receive, send)
    return sent


def _status(sent) -> int:
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def _headers(sent) -> dict[bytes, bytes]:
    return dict(next(m["headers"] for m in sent if m["type"] == "http.response.start"))


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_the_cap_is_a_limit_from_the_environment(monkeypatch):
    monkeypatch.delenv("FACEAGE_UI_UPLOAD_CACHE_BYTES", raising=False)
    assert Limits.from_env().ui_upload_cache_bytes == 256 * 1024 * 1024
    monkeypatch.setenv("FACEAGE_UI_UPLOAD_CACHE_BYTES", "5000")
    assert Limits.from_env().ui_upload_cache_bytes == 5000
    monkeypatch.setenv("FACEAGE_UI_UPLOAD_CACHE_BYTES", "-1")
    with pytest.raises(ValueError, match="FACEAGE_UI_UPLOAD_CACHE_BYTES must be >= 0"):
        Limits.from_env()


def test_an_upload_past_the_cache_cap_gets_429_and_the_rest_of_the_ui_does_not(tmp_path):
    (tmp_path / "abc").mkdir()
    (tmp_path / "abc" / "photo.jpg").write_bytes(b"x" * 9_000)
    now = [0.0]
    gate = UIGateMiddleware(_ok, ui=LazyUI(), max_concurrent=4, upload_cache_bytes=10_000,
                            upload_folder=lambda: str(tmp_path), clock=lambda: now[0])
    assert _status(asyncio.run(_call(gate, UPLOAD, length=900))) == 200  # 9,000 + 900 <= 10,000
    refused = asyncio.run(_call(gate, UPLOAD, length=900))  # the admitted 900 counts before the next walk
    assert _status(refused) == 429 and int(_headers(refused)[b"retry-after"]) > 0
    assert b"FACEAGE_UI_UPLOAD_CACHE_BYTES" in refused[1]["body"] and b"10-15 minutes" in refused[1]["body"]
    assert _status(asyncio.run(_call(gate, "/ui/gradio_api/queue/join", length=900))) == 200  # not an upload
    assert _status(asyncio.run(_call(gate, "/ui/", method="GET", length=0))) == 200
    for f in (tmp_path / "abc").iterdir():  # Gradio's purge
        f.unlink()
    now[0] += 1.5
    assert _status(asyncio.run(_call(gate, UPLOAD, length=900))) == 200


def test_the_folder_is_walked_at_most_once_a_second(tmp_path, monkeypatch):
    walks = []
    real = faceage.ui.folder_bytes
    monkeypatch.setattr(faceage.ui, "folder_bytes", lambda folder: walks.append(folder) or real(folder))
    now = [0.0]
    gate = UIGateMiddleware(_ok, ui=LazyUI(), max_concurrent=4, upload_cache_bytes=10**9,
                            upload_folder=lambda: str(tmp_path), clock=lambda: now[0])
    for _ in range(20):
        assert _status(asyncio.run(_call(gate, UPLOAD))) == 200
    assert len(walks) == 1
    now[0] += 1.5
    asyncio.run(_call(gate, UPLOAD))
    assert len(walks) == 2


def test_a_missing_folder_holds_nothing_and_zero_means_no_cap(tmp_path):
    gate = UIGateMiddleware(_ok, ui=LazyUI(), max_concurrent=4, upload_cache_bytes=10_000,
                            upload_folder=lambda: str(tmp_path / "not-yet"))
    assert _status(asyncio.run(_call(gate, UPLOAD, length=900))) == 200
    (tmp_path / "big").write_bytes(b"x" * 50_000)
    gate = UIGateMiddleware(_ok, ui=LazyUI(), max_concurrent=4, upload_cache_bytes=0,
                            upload_folder=lambda: str(tmp_path))
    assert _status(asyncio.run(_call(gate, UPLOAD, length=900))) == 200


def test_the_ui_says_uploads_are_kept_10_to_15_minutes(tmp_path):
    """delete_cache=(frequency, age): every ``frequency`` s Gradio deletes the files older than ``age`` s, so a
    file lives from ``age`` to ``age + frequency`` (gradio/route_utils.py, delete_files_on_schedule)."""
    import gradio as gr

    from faceage.ui import UI_CACHE_AGE_S, UI_CACHE_PURGE_S, ui_predict

    assert (UI_CACHE_AGE_S, UI_CACHE_AGE_S + UI_CACHE_PURGE_S) == (600, 900)
    with pytest.raises(gr.Error, match="kept 10-15 minutes"):
        asyncio.run(ui_predict(str(tmp_path / "gone.jpg"), 1000))
    lazy = LazyUI()
    lazy.configure({"registered_version": "1"}, 1_000_000)
    [mount] = [r for r in lazy._build().routes if getattr(r, "path", "") == "/ui"]
    assert mount.app.get_blocks().delete_cache == (UI_CACHE_PURGE_S, UI_CACHE_AGE_S)


def test_the_cap_stays_below_the_file_system_holding_the_cache(tmp_path):
    """A container's /dev/shm (Docker's default 64 MB, `--shm-size=256m` in the README) filled before a 256 MiB cap:
    uploads then failed with a 500 instead of a 429. The cap is at most 3/4 of that file system."""
    from faceage.ui import UploadBudget, file_system_bytes

    small = UploadBudget(256 * 2**20, folder=lambda: str(tmp_path), fs_bytes=lambda folder: 64_000_000)
    assert small.max_bytes == 48_000_000
    assert small.admit(47_000_000) and not small.admit(2_000_000)
    large = UploadBudget(256 * 2**20, folder=lambda: str(tmp_path), fs_bytes=lambda folder: 10**12)
    assert large.max_bytes == 256 * 2**20
    assert file_system_bytes(str(tmp_path / "not" / "yet")) == file_system_bytes(str(tmp_path)) > 0
