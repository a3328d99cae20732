"""The base of every error a user can fix (bad params, bad data, unreachable files), and the one line it prints as.

Stage CLIs print these as one clear line and exit 1 (see :func:`faceage.logs.run_stage`);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FaceAgeError(Exception):
    """An error caused by input or configuration; its message says what to change."""


def error_line(error: BaseException, *, with_type: bool = True) -> str:
    """``error`` as the one line a stage or the runner logs: ``Type: message``.

    A message raised on several lines (a hint added on its own line, ``"...\\nWithout a connection ...,
    point fetch_data.source at a local copy"``; each URL that failed, one a line) keeps every line, joined with
    ``"; "`` (with a space alone after a line ending in ``:``): printed as they were, the further lines lacked
    the time, level and logger of the first, so ``grep ERROR`` and the last line DVC shows lost the hint. The
    exception itself keeps its message as raised.

    Args:
        error: The exception.
        with_type: Start with the exception's class name, as :func:`faceage.logs.run_stage` prints it.

    Returns:
        The line, without a line break.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return f"{type(error).__name__}: {text}" if with_type else text
