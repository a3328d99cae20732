"""Round 32, a second read of round 31's changes from photos to chips: the CLI's "no images found" line counts
the photos of the subfolders without warning of photos "reported once" and without counting unlisted folders, and
an annotated copy cut short by Ctrl-C is removed as one cut short by a full disk."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from faceage.cli import main


def _error_lines(capsys) -> tuple[list[str], list[str]]:
    err = capsys.readouterr().err.splitlines()
    return [line for line in err if "ERROR" in line], [line for line in err if "WARNING" in line]


def test_no_images_count_of_subfolders_warns_of_no_photo_reported_and_counts_each_photo_once(tmp_path, capsys):
    """With no photo in the folder given, the subfolders were scanned to count theirs, through the scan that
    reports photos: a photo linked under a second name printed "... reported once, as ..." for a run that
    reported nothing, and the count is of photos, each once."""
    root = tmp_path / "collection"
    (root / "test").mkdir(parents=True)
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(root / "test" / "a.jpg")
    os.symlink("a.jpg", root / "test" / "b.jpg")
    assert main(["predict", "--json", str(root), "--model", str(tmp_path / "none.pt")]) == 1
    errors, warnings = _error_lines(capsys)
    [line] = errors
    assert f"no images found in {root}" in line and "hold 1 photo:" in line and "--recursive" in line
    assert not warnings, warnings


def test_no_images_counts_no_unlisted_folder_as_a_photo(tmp_path, capsys):
    """A subfolder the scan cannot list (here: its path longer than the system takes) was counted as a photo:
    "their subfolders hold 1 photo: add --recursive to read them", for a folder tree with none."""
    root = tmp_path / "empty"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(20):  # 20 x 250 characters: past PATH_MAX (4096), made relative to each folder
            os.mkdir("d" * 250, dir_fd=fd)
            deeper = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = deeper
    finally:
        os.close(fd)
    assert main(["predict", "--json", str(root), "--model", str(tmp_path / "none.pt")]) == 1
    [line] = _error_lines(capsys)[0]
    assert f"no images found in {root}" in line
    assert "--recursive" not in line and "photo" not in line.split(f"no images found in {root}")[1], line


def test_ctrl_c_while_an_annotated_copy_is_written_leaves_no_partial_file(tmp_path, monkeypatch):
    """Only an OSError removed the copy being written: Ctrl-C there left an empty or cut PNG in the --annotate
    folder, which a later scan of that folder (the photos' own, as allowed) read as a photo that fails."""
    import builtins

    import faceage.cli
    from faceage.cli import write_annotated

    class Interrupted:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:100])
            raise KeyboardInterrupt

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(faceage.cli, "open", lambda *a, **k: Interrupted(builtins.open(*a, **k)), raising=False)
    out = tmp_path / "annotated"
    out.mkdir()
    image = np.full((60, 80, 3), 120, np.uint8)
    try:
        write_annotated(out, tmp_path / "photo.jpg", image, [])
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interrupt was swallowed")
    assert list(out.iterdir()) == []
