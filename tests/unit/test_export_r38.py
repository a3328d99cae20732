"""Round 38: the ONNX export's file handling and the served model's messages on damaged files.

Real exports of a small untrained checkpoint, checked on the astronaut's real face crops (test_export's fixtures).
"""

from __future__ import annotations

import onnx
import pytest

from faceage.export import META_KEY, ExportError, export_onnx
from faceage.onnx_model import OnnxAgeModel, OnnxGraphError
from tests.unit.test_export import astronaut, crops
from tests.unit.test_predict import make_checkpoint

FIXTURES = (astronaut, crops)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, detector_dir, crops):
    root = tmp_path_factory.mktemp("exported")
    checkpoint = make_checkpoint(root / "model.pt", detector_dir)
    export_onnx(checkpoint, detector_dir, crops, root / "model.onnx")
    return root / "model.onnx"


def test_a_refused_export_keeps_the_previous_graph_and_leaves_no_partial_file(tmp_path, detector_dir, crops, exported):
    """The graph was written straight to ``out_path`` and deleted when the check refused it: a re-export over a
    served model.onnx destroyed the good file, and a second export to the same path (or a reader) saw the first's
    unchecked, half-written bytes. Now the new graph is checked in a temporary file beside it and replaces
    ``out_path`` only once it passed."""
    out = tmp_path / "model.onnx"
    previous = exported.read_bytes()
    out.write_bytes(previous)
    checkpoint = make_checkpoint(tmp_path / "model.pt", detector_dir)
    with pytest.raises(ExportError, match="differs from torch by .* in the age distribution"):
        export_onnx(checkpoint, detector_dir, crops, out, tolerance=-1.0)
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt"]


def test_a_passing_export_replaces_the_file_and_leaves_nothing_else(tmp_path, detector_dir, crops, exported):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an older, broken file")
    checkpoint = make_checkpoint(tmp_path / "model.pt", detector_dir)
    export_onnx(checkpoint, detector_dir, crops, out)
    assert out.read_bytes() == exported.read_bytes()  # the same bytes as an export to a fresh path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt"]


def test_settings_that_are_not_json_are_an_onnx_graph_error(tmp_path, exported):
    """The settings entry is read with json.loads: a damaged one raised JSONDecodeError's bare traceback
    ("Unterminated string starting at ..."), naming neither the file nor the entry."""
    proto = onnx.load(str(exported))
    entry = next(e for e in proto.metadata_props if e.key == META_KEY)
    entry.value = entry.value[:50]
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(OnnxGraphError, match=r"bad.onnx: its 'faceage' settings are not JSON"):
        OnnxAgeModel(tmp_path / "bad.onnx")


def test_settings_that_are_not_an_object_are_an_onnx_graph_error(tmp_path, exported):
    proto = onnx.load(str(exported))
    next(e for e in proto.metadata_props if e.key == META_KEY).value = "[1, 2]"
    onnx.save(proto, str(tmp_path / "list.onnx"))
    with pytest.raises(OnnxGraphError, match=r"list.onnx: its 'faceage' settings are not a JSON object"):
        OnnxAgeModel(tmp_path / "list.onnx")


def test_a_copy_cut_short_before_its_settings_is_not_called_a_foreign_graph(tmp_path, exported):
    """The settings are the file's last field, so a copy cut right before them parses as a graph; the message
    only said "export it with faceage.export", though the file was a FaceAge export cut short."""
    proto = onnx.load(str(exported))
    del proto.metadata_props[:]
    data = proto.SerializeToString()
    assert exported.read_bytes().startswith(data)  # a true prefix of the exported file
    (tmp_path / "cut.onnx").write_bytes(data)
    with pytest.raises(OnnxGraphError, match=r"cut.onnx has no 'faceage' metadata: .*cut short"):
        OnnxAgeModel(tmp_path / "cut.onnx")


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5, 3)])
def test_an_empty_crop_is_called_an_empty_array(detector_dir, shape):
    """The message read "got an empty of shape (0, 0, 3)": the noun was left out."""
    import numpy as np

    from faceage.face_encoder import DlibFaceEncoder

    with pytest.raises(ValueError, match=r"non-empty square face crop .* got an empty array of shape \(0, "):
        DlibFaceEncoder(detector_dir, 0.4).embed(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("threads", [None, 0, -1])
def test_a_thread_count_that_is_not_positive_is_named_not_blamed_on_the_file(exported, threads):
    """``threads=None`` (AgePredictor's "pick for me") was reported as "model.onnx is not an ONNX graph ONNX
    Runtime can load: int() argument must be ..."; 0 and -1 were taken, and ONNX Runtime then started a thread per
    physical core, ignoring the container's CPU quota and affinity (the oversubscription the threads are set to
    avoid)."""
    with pytest.raises(ValueError, match=rf"threads must be a whole number >= 1, got {threads}") as caught:
        OnnxAgeModel(exported, threads=threads)
    assert not isinstance(caught.value, OnnxGraphError)


_EXPORT_SCRIPT = """
import sys
import numpy as np
from faceage.export import export_onnx
data = np.load(sys.argv[3])
export_onnx(sys.argv[1], sys.argv[2], list(data["crops"]), sys.argv[4])
print("exported")
"""


def test_two_exports_to_one_path_at_once_both_pass_and_leave_one_whole_graph(tmp_path, detector_dir, crops, exported):
    """Two processes (two `make bento`s, or a retry beside a hung one) exporting to one path: each wrote the graph
    there, read it back, added its settings and loaded it, so one could read the other's half-written bytes
    ("Protobuf parsing failed") or check a file the other was rewriting."""
    import os
    import subprocess
    import sys

    import numpy as np

    checkpoint = make_checkpoint(tmp_path / "model.pt", detector_dir)
    np.savez(tmp_path / "crops.npz", crops=np.stack(crops))
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", _EXPORT_SCRIPT, str(checkpoint), str(detector_dir),
                              str(tmp_path / "crops.npz"), str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [run.communicate(timeout=600) for run in runs]
    for run, (stdout, stderr) in zip(runs, results):
        assert run.returncode == 0, stderr[-2000:]
        assert stdout.strip() == "exported"
    assert out.read_bytes() == exported.read_bytes()  # one whole graph, the bytes of a lone export
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]
