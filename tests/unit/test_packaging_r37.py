"""Round 37: packaging after an interrupted BentoML save (Ctrl-C, SIGTERM under `timeout`, a cancelled CI job)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_code(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'unused.db'}"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_half_saved_model_folder_does_not_break_the_next_package(tmp_path):
    """A store folder left without model.yaml (a save interrupted before BentoML wrote it) made
    bentoml.models.list raise, so every later package failed in stored_copy with BentoML's traceback."""
    code = f"""
import shutil
from pathlib import Path
import bentoml
from faceage.packaging import stored_copy
staged = Path({str(tmp_path / 'staged')!r})
staged.mkdir()
(staged / "model.pt").write_bytes(b"weights")
(staged / "faceage.json").write_text('{{"mlflow_run_id": "abc"}}')
labels = {{"alias": "champion"}}
with bentoml.models.create("face_age", labels=labels) as model:
    shutil.copytree(staged, model.path, dirs_exist_ok=True)
store = Path({str(tmp_path / 'bentoml' / 'models' / 'face_age')!r})
(store / "zzzzhalfsaved").mkdir()  # what an interrupted copy leaves: files, no model.yaml yet
(store / "zzzzhalfsaved" / "model.pt").write_bytes(b"wei")
same = stored_copy("face_age", staged, labels)
assert same is not None and same.tag == model.tag, same
print("OK")
"""
    out = run_code(code, tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
    assert "zzzzhalfsaved" in out.stderr  # the warning names the folder to delete


def test_an_interrupted_save_leaves_no_half_saved_model_in_the_store(tmp_path):
    """BentoML removes the store's folder when the copy raises an Exception, not on KeyboardInterrupt (what Ctrl-C
    and, in stages/package.py, SIGTERM raise): face_age/<version> stayed half-copied in the store."""
    code = f"""
import os, signal, threading, time
from pathlib import Path
import bentoml
from faceage.packaging import save_new_model
staged = Path({str(tmp_path / 'staged')!r})
staged.mkdir()
with open(staged / "model.pt", "wb") as f:  # big enough that the copy is under way when the signal comes
    f.write(os.urandom(1 << 20) * 400)
store = Path({str(tmp_path / 'bentoml' / 'models' / 'face_age')!r})

def interrupt():  # Ctrl-C once the store's copy has begun
    while not any(store.glob("*/model.pt")):
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=interrupt, daemon=True).start()
try:
    save_new_model("face_age", staged, {{"alias": "champion"}}, {{}})
except KeyboardInterrupt:
    print("interrupted")
else:
    print("not interrupted: the copy was too quick")
left = [p.name for p in store.iterdir() if p.is_dir()] if store.is_dir() else []
print("LEFT", left)
print("LIST", bentoml.models.list("face_age") if store.is_dir() else [])
"""
    out = run_code(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "interrupted" in out.stdout and "not interrupted" not in out.stdout, out.stdout
    assert "LEFT []" in out.stdout, out.stdout
