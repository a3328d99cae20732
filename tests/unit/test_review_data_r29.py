"""Review round 29, data fetching: what a user sees when fetch_data reads a zip or a flaky download."""

import hashlib
import http.server
import threading
import unicodedata
import zipfile

import pytest

from faceage.appa_real import LayoutError, fetch_appa_real
from faceage.download import DownloadError, download
from tests.unit.test_appa_real import make_release, zip_release


def test_a_broken_zip_names_the_zip_not_the_deleted_unzipped_copy(tmp_path):
    """A layout error in a local zip named the hidden folder it was unzipped into (``.appa-real-PID@HOST-...-zip``),
    deleted before the message reached the user: nothing they could open or fix."""
    archive = zip_release(make_release(tmp_path / "appa-real-release", missing=("valid001.jpg",)),
                          tmp_path / "release.zip")
    out = tmp_path / "data" / "appa-real"
    with pytest.raises(LayoutError, match="missing") as missing:
        fetch_appa_real(str(archive), out)
    assert f"{archive}/appa-real-release/valid" in str(missing.value)
    assert f"{out.parent}/." not in str(missing.value)

    # A zip whose release sits too deep for the one level searched: the message names the zip.
    deep = tmp_path / "deep.zip"
    with zipfile.ZipFile(deep, "w") as zf:
        zf.writestr("home/user/appa-real-release/gt_avg_train.csv", "file_name\n")
    with pytest.raises(LayoutError, match="no gt_avg_train.csv found") as nowhere:
        fetch_appa_real(str(deep), out)
    assert f"found in {deep} or its immediate subfolders" in str(nowhere.value)
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == []


BODY = bytes(range(256)) * 4096  # 1 MiB


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves BODY with Range support, and every response dies after ``server.cut`` bytes of its body."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        start = int((self.headers.get("Range") or "bytes=0-").removeprefix("bytes=").split("-")[0])
        self.server.starts.append(start)
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
        self.send_header("Content-Length", str(len(BODY) - start))
        self.end_headers()
        self.wfile.write(BODY[start:start + self.server.cut])
        self.wfile.flush()
        if start + self.server.cut < len(BODY):
            self.connection.shutdown(2)  # the connection dies mid-body


@pytest.fixture
def flaky():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    srv.starts, srv.cut = [], 128 * 1024
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_a_connection_that_drops_often_but_makes_progress_is_resumed_to_the_end(flaky, tmp_path):
    """``retries`` bounds failures in a row, not the whole transfer: a large zip over a line that drops every
    so many MB, each drop resumed further on, failed after retries + 1 drops (5 by default), however close to
    the end it was."""
    sha = hashlib.sha256(BODY).hexdigest()
    dest = download(f"http://127.0.0.1:{flaky.server_address[1]}/f.zip", tmp_path / "f.zip", sha256=sha,
                    retries=2, backoff_s=0.0, progress=False)
    assert dest.read_bytes() == BODY
    assert len(flaky.starts) == 8 and flaky.starts == sorted(set(flaky.starts))  # each resume further on

    # A connection that makes no progress at all still gives up after retries + 1 tries.
    flaky.cut, flaky.starts = 0, []
    with pytest.raises(DownloadError, match="failed after 3 attempts"):
        download(f"http://127.0.0.1:{flaky.server_address[1]}/g.zip", tmp_path / "g.zip", sha256=sha,
                 retries=2, backoff_s=0.0, progress=False)
    assert flaky.starts == [0, 0, 0]


def _accented_release(root, form):
    """A release whose first train image is named ``José 1.jpg``: the CSV spells it in NFC (as typed, or written by a
    script), the files in ``form``."""
    make_release(root)
    name = "José 1.jpg"
    table = root / "gt_avg_train.csv"
    table.write_text(table.read_text(encoding="utf-8").replace("train000.jpg", name), encoding="utf-8")
    on_disk = unicodedata.normalize(form, name)
    (root / "train" / "train000.jpg").rename(root / "train" / on_disk)
    (root / "train" / "train000.jpg_face.jpg").rename(root / "train" / (on_disk + "_face.jpg"))
    return root, name


@pytest.mark.parametrize("packed", ["folder", "zip"])
def test_names_a_mac_wrote_decomposed_match_the_csvs_composed_spelling(tmp_path, packed):
    """macOS writes é as e + a combining accent (NFD) in the zips its Archive Utility makes (and in folders copied
    from HFS+); a CSV holds the composed é (NFC). Linux compares bytes: every accented image was "missing"."""
    release, name = _accented_release(tmp_path / "appa-real-release", "NFD")
    source = zip_release(release, tmp_path / "release.zip") if packed == "zip" else release
    info = fetch_appa_real(str(source), tmp_path / "out")
    assert info["counts"]["train"] == 3 and info["release_face_crops"] == 9
    train = tmp_path / "out" / "train"
    # Copied under the CSV's spelling: what preprocess reads the rows by.
    assert (train / name).read_bytes() == (release / "train" / unicodedata.normalize("NFD", name)).read_bytes()
    assert (train / (name + "_face.jpg")).is_file()



def _zip_with_links(release, archive):
    """``release`` zipped with ``train000.jpg`` stored as a symbolic link (as ``zip -y`` stores one), and a link no
    CSV lists beside the CSVs."""
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(release.rglob("*")):
            arcname = p.relative_to(release.parent).as_posix()
            if p.name == "train000.jpg":
                link = zipfile.ZipInfo(arcname)
                link.create_system, link.external_attr = 3, (0o120777 << 16)  # made on Unix, a symbolic link
                zf.writestr(link, "/Users/me/photos/train000.jpg")
            else:
                zf.write(p, arcname)
        latest = zipfile.ZipInfo(f"{release.name}/latest")
        latest.create_system, latest.external_attr = 3, (0o120777 << 16)
        zf.writestr(latest, "train")
    return archive


def test_a_photo_zipped_as_a_symbolic_link_is_named_not_taken_as_its_target_path(tmp_path):
    """``zip -y`` (and macOS's Archive Utility) store a symbolic link as the path it points to: extracted, that text
    became ``train/train000.jpg`` and fetch_data passed, leaving preprocess an undecodable "photo"."""
    release = make_release(tmp_path / "appa-real-release")
    out = tmp_path / "out"
    with pytest.raises(LayoutError, match=r"missing .*\['train000.jpg'\]\n2 entries of the zip are symbolic links"):
        fetch_appa_real(str(_zip_with_links(release, tmp_path / "linked.zip")), out)
    assert not out.exists()

    # Links no CSV lists are skipped, and the rest is read as before.
    table = release / "gt_avg_train.csv"
    table.write_text("".join(line for line in table.read_text().splitlines(True) if "train000.jpg" not in line))
    info = fetch_appa_real(str(_zip_with_links(release, tmp_path / "unlisted.zip")), out)
    assert info["counts"] == {"train": 2, "valid": 3, "test": 3}
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "gt_avg_test.csv", "gt_avg_train.csv",
                                                     "gt_avg_valid.csv", "test", "train", "valid"]


def test_an_external_set_a_mac_spelled_is_found_and_its_accented_photo_cropped(tmp_path, detector_dir):
    """evaluate.external sets are read in place, so fetch_data's copy under the CSV's spelling does not help them:
    the check of the layout called a Mac-made set's accented photos missing, and the crops could not open them."""
    from PIL import Image
    from skimage.data import astronaut

    from faceage.appa_real import Sample
    from faceage.config import PreprocessParams
    from faceage.preprocess import crop_samples
    from faceage.sources import resolve_external

    root = tmp_path / "set"
    (root / "test").mkdir(parents=True)
    name = "José 1.jpg"
    (root / "gt_avg_test.csv").write_text(f"file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age\n"
                                          f"{name},1,30,0,30\n", encoding="utf-8")
    Image.fromarray(astronaut()).save(root / "test" / unicodedata.normalize("NFD", name), "JPEG")
    [ext] = resolve_external([str(root)])
    out = tmp_path / "faces"
    out.mkdir()
    rows = crop_samples({"test": [Sample("test", name, 30.0, 0.0, 30.0)]}, root, detector_dir, out,
                        PreprocessParams(workers=1, cnn_retry_side=0, size=64))
    assert ext.path == root and [r["status"] for r in rows] == ["face"]
