"""Second read of round 38 (plumbing): a rewrite that keeps a read-only file's mode must still be writable while it
is written, by any writer of the staging file (torch.save writes ``model.pt`` by name, through a handle of its own)."""

import os
import stat

import pytest

from tests.unit.test_plumbing_r38 import _as_unprivileged


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_checkpoint_over_a_read_only_dvc_hardlink_is_written_and_keeps_its_mode(tmp_path):
    """``dvc config cache.type hardlink``: ``models/model.pt`` is a hard link into the cache, mode 0444. Training it
    again outside ``dvc repro`` (``python stages/train.py ...``, the README's command) made the staging file 0444
    before torch.save opened it by name: "Permission denied", where round 37 wrote a 0644 file."""
    cache = tmp_path / ".dvc" / "cache" / "files" / "md5" / "ab" / "cdef"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"old checkpoint")
    cache.chmod(0o444)
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir()
    os.link(cache, model)  # what DVC's hardlink checkout leaves in the workspace
    proc = _as_unprivileged(f"""
        import torch
        from faceage.model import save_checkpoint
        save_checkpoint({str(model)!r}, torch.nn.Linear(2, 1), {{"backbone": "test"}})
        print("saved")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "saved", proc.stdout + proc.stderr[-1500:]
    assert cache.read_bytes() == b"old checkpoint"  # the cache's copy untouched: a new file, not written through
    assert model.stat().st_ino != cache.stat().st_ino
    assert stat.S_IMODE(model.stat().st_mode) == 0o444  # the file's mode kept (round 38), once written
    assert [p.name for p in model.parent.iterdir()] == ["model.pt"]  # no staging file left behind


def test_a_file_already_there_takes_the_part_a_killed_run_set_aside_with_it(tmp_path):
    """A run killed while a restart from byte 0 streamed leaves ``f.bin.part.kept`` (up to the whole zip, 1 GB); the
    file then put at the destination by hand (as the download's errors advise) returned "already present" and left
    the kept part (and the restart's part) in the download cache for good: nothing else ever looks at them."""
    import hashlib
    import random

    from faceage.download import download

    body = random.Random(382).randbytes(200_000)
    dest = tmp_path / "f.bin"
    dest.write_bytes(body)
    (tmp_path / "f.bin.part.kept").write_bytes(body[:150_000])  # the part a killed run had set aside
    (tmp_path / "f.bin.part.kept.meta").write_text('{"url": "http://127.0.0.1:9/f.bin", "etag": "\\"v1\\""}')
    (tmp_path / "f.bin.part").write_bytes(body[:50_000])  # the restart's bytes it was streaming
    # Port 9 (discard): nothing is asked of it, the file there is verified first
    got = download("http://127.0.0.1:9/f.bin", dest, sha256=hashlib.sha256(body).hexdigest(), progress=False)
    assert got == dest and dest.read_bytes() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == [".f.bin.lock", "f.bin"]


def test_without_a_checksum_a_page_sent_without_a_length_does_not_replace_the_part_either(tmp_path):
    """Round 38 refused a whole body shorter than the part answering its resume only where the server said its
    length (Content-Length): a captive portal's page sent without one (chunked, or ended by closing the connection,
    as dynamic pages are) over plain http without a checksum (dlib.net's detector files) still became the file, and
    the 600 KB already fetched were dropped."""
    from faceage.download import ContentError, download
    from tests.conftest import http_server
    from tests.unit.test_download_r38 import BODY, HELD, PAGE, UNSIZED, _Handler, _honest, _url

    (tmp_path / "f.bin.part").write_bytes(BODY[:HELD])
    with http_server(_Handler, requests=[], drop_after=None,
                     answer=lambda start: (200, PAGE, {UNSIZED: True})) as server:
        with pytest.raises(ContentError) as caught:
            download(_url(server), tmp_path / "f.bin", progress=False)
        message = str(caught.value)
        assert f"{len(PAGE)} bytes" in message and f"keeps the {HELD} bytes" in message, message
        assert not (tmp_path / "f.bin").exists()
        assert (tmp_path / "f.bin.part").read_bytes() == BODY[:HELD]
        assert sorted(p.name for p in tmp_path.iterdir()) == [".f.bin.lock", "f.bin.part"]
        server.answer, server.requests = _honest, []  # back on the real network: the part is resumed
        assert download(_url(server), tmp_path / "f.bin", progress=False).read_bytes() == BODY
        assert server.requests == [f"bytes={HELD}-"]
