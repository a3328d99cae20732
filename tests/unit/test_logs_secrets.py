"""A stage's traceback does not print the tracking URI's credentials (MLflow's errors quote the URL as given)."""

import os
import subprocess
import sys

import pytest

from faceage.logs import mask_tracking_secrets

STAGE = """
from faceage.errors import FaceAgeError
from faceage.logs import run_stage, setup_logging

setup_logging()
def main():
    {body}
run_stage(main)
"""


def run(body: str, uri: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([sys.executable, "-c", STAGE.format(body=body)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_a_bugs_traceback_masks_the_password_of_the_tracking_uri():
    uri = "http://alice:s3cr%40t-pw@127.0.0.1:9"
    done = run(f"raise RuntimeError('API request to {uri}/api/2.0/mlflow/runs/create failed (password s3cr@t-pw)')",
               uri)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "RuntimeError: API request to" in done.stderr
    assert "s3cr" not in done.stderr
    assert "http://alice:***@127.0.0.1:9/api/2.0/mlflow/runs/create" in done.stderr
    assert "(password ***)" in done.stderr  # the percent-decoded password alone


def test_a_token_alone_is_masked_in_a_faceage_errors_line():
    uri = "https://TOKEN123abc@mlflow.example.org"
    done = run(f"raise FaceAgeError('the server {uri} said 401')", uri)
    assert done.returncode == 1
    assert "TOKEN123abc" not in done.stderr and "FaceAgeError: the server https://***@mlflow.example.org said 401" in done.stderr


def test_without_credentials_a_bug_propagates_as_python_prints_it():
    done = run("raise RuntimeError('plain bug')", "http://127.0.0.1:9")
    assert done.returncode == 1 and done.stderr.rstrip().endswith("RuntimeError: plain bug")
    assert mask_tracking_secrets("nothing secret") is None


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "http://127.0.0.1:5000", ""])
def test_uris_without_a_user_part_mask_nothing(monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert mask_tracking_secrets("http://127.0.0.1:5000 sqlite:///mlflow.db") is None
