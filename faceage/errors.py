"""The base of every error a user can fix (bad params, bad data, unreachable files).

Stage CLIs print these as one clear line and exit 1 (see :func:`faceage.logs.run_stage`);
anything else is a bug and keeps its traceback.
"""


class FaceAgeError(Exception):
    """An error caused by input or configuration; its message says what to change."""
