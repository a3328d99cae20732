"""FaceAge: face-age estimation library."""

import os as _os
import sys as _sys

# `python -m faceage.experiment` started inside this folder puts it first on sys.path, where our
# packaging.py hides the `packaging` library that mlflow and bentoml import (ModuleNotFoundError:
# 'packaging' is not a package). This package's modules are never top-level modules: drop the entry
# ("" for `python -c` and the REPL: the current folder, this one when started inside it).
if _sys.path and _os.path.realpath(_sys.path[0] or _os.curdir) == _os.path.dirname(_os.path.realpath(__file__)):
    del _sys.path[0]
