"""check_sources' train.pretrained record across a backbone switch."""

import json
import os
import subprocess
import sys

import yaml

from tests.conftest import REPO


def _check_sources(tmp_path, backbone: str, pretrained: str) -> subprocess.CompletedProcess:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["fetch_data"].update(source="https://example.invalid/a.zip", md5="0" * 32)  # a URL: pinned, not read
    params["evaluate"]["external"] = []
    params["train"].update(backbone=backbone, pretrained=pretrained)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, str(REPO / "stages" / "check_sources.py"), "--params", "params.yaml",
           "--source", "out/source.json", "--external", "out/external.json", "--pretrained", "out/pretrained.json"]
    return subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)


def test_a_dlib_record_does_not_stand_for_a_missing_weights_file_after_a_backbone_switch(tmp_path):
    """dlib_age reads no file of train.pretrained, so its record is kind "dlib". Switched to a CNN with a value
    naming a file that is not there, check_sources kept that record with a warning ("keeping the fingerprint
    recorded") and the pipeline failed in train, after preprocess and embed. (Since round 31 dlib_age refuses a
    weights file itself: its record is made with train.pretrained=dlib.)"""
    done = _check_sources(tmp_path, "dlib_age", "dlib")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "pretrained.json").read_text())["kind"] == "dlib"
    done = _check_sources(tmp_path, "resnet18", str(tmp_path / "nowhere.pth"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "no such weights file" in done.stderr and "keeping the fingerprint" not in done.stderr
    assert json.loads((tmp_path / "out" / "pretrained.json").read_text())["kind"] == "dlib"  # left as it was
