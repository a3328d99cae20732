"""Round 38's second review (config, evaluation, training, chips, appa_real, sources, benchmarks): defects found
in the round's own changes. Real files, real symlinks."""

from __future__ import annotations

import os

import pytest


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_a_params_file_that_is_a_symlink_loop_is_not_told_to_chmod(tmp_path):
    """Round 38 turned every OSError reading ``--params`` into one line, each ending "make it readable (chmod a+r)".
    A symlink loop (ELOOP), like an I/O error, is no permission problem: chmod follows the link and fails the same
    way. The advice to chmod is for PermissionError alone; the rest name the error and the file to fix."""
    from faceage.config import ConfigError, load_params

    loop = tmp_path / "params.yaml"
    loop.symlink_to(loop)
    with pytest.raises(ConfigError) as raised:
        load_params(loop)
    message = str(raised.value)
    assert f"cannot read {loop}" in message and "symbolic links" in message, message
    assert "chmod" not in message, message


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_a_params_file_without_read_permission_is_still_told_to_chmod(tmp_path):
    from faceage.config import ConfigError, load_params

    params = tmp_path / "params.yaml"
    params.write_text("train: {}\n")
    params.chmod(0)
    try:
        with pytest.raises(ConfigError, match=r"cannot read .*params\.yaml: Permission denied.*chmod a\+r"):
            load_params(params)
    finally:
        params.chmod(0o644)
