"""Round 38: packaging's last two steps, the BentoML model made ``latest`` and the registry's ``champion`` alias."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_code(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh process on a BentoML store and an MLflow sqlite store of the test's own."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


# Two champions in turn, each a real registry version and a real (tiny) BentoML model. The second one's alias
# cannot be written: another process holds the sqlite store's write lock (a training run logging, `mlflow gc`,
# a `sqlite3 mlflow.db` session), as a registry that is unreachable or read-only for the time of the call.
PUBLISH_TWICE = """
import os, sqlite3
from pathlib import Path
import bentoml, mlflow
from faceage.packaging import PackagingError, publish_champion, save_new_model
from faceage.tracking import setup_mlflow, tracking_uri

tmp = Path({tmp!r})
setup_mlflow()
client = mlflow.MlflowClient(tracking_uri())
client.create_registered_model("face-age")

def staged(name):
    folder = tmp / name
    folder.mkdir()
    (folder / "model.pt").write_bytes(name.encode() * 1000)
    return folder

def save(folder, version):
    return lambda: save_new_model("face_age", folder, {{"alias": "champion"}}, {{"registered_version": version}})

v1 = client.create_model_version("face-age", str(staged("one")), run_id=None)
first = publish_champion(client, v1, save(tmp / "one", "1"))
print("FIRST", first.tag)
v2 = client.create_model_version("face-age", str(staged("two")), run_id=None)
lock = sqlite3.connect(str(tmp / "mlflow.db"), timeout=0, isolation_level=None)
lock.execute("BEGIN EXCLUSIVE")
try:
    publish_champion(client, v2, save(tmp / "two", "2"))
except PackagingError as e:
    print("ERROR", e)
finally:
    lock.execute("ROLLBACK")
    lock.close()
print("LATEST", bentoml.models.get("face_age:latest").tag)
print("ALIAS", client.get_model_version_by_alias("face-age", "champion").version)
print("MODELS", len(bentoml.models.list("face_age")))
"""


def test_an_alias_that_cannot_be_moved_puts_latest_back_on_the_model_mlflow_calls_champion(tmp_path):
    """The alias moves once the BentoML model is saved, and saving it makes it ``face_age:latest``: when the alias
    then failed (the registry locked, unreachable or read-only), ``bentoml serve`` / ``make bento`` served the new
    model while MLflow's champion stayed the old one, with MLflow's traceback as the only word of it."""
    out = run_code(PUBLISH_TWICE.format(tmp=str(tmp_path)), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.stdout.splitlines() if " " in line}
    assert "ERROR" in lines, out.stdout + out.stderr[-3000:]
    assert lines["LATEST"] == lines["FIRST"], "face_age:latest names a model the registry does not call champion"
    assert lines["ALIAS"] == "1"
    assert lines["MODELS"] == "2"  # the new model stays in the store: `make bento` again reuses it
    error = lines["ERROR"]
    assert "face-age@champion" in error and "version 2" in error and "locked" in error, error
    assert f"face_age:latest is back on {lines['FIRST']}" in error, error
