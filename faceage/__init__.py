"""FaceAge: face-age estimation library."""

import os as _os
import sys as _sys

# `python -m faceage.experiment` started inside this folder puts it first on sys.path, where our
# packaging.py hides the `packaging` library that mlflow and bentoml import (ModuleNotFoundError:
# 'packaging' is not a package). This package's modules are never top-level modules: drop the entry
# ("" for `python -c` and the REPL: the current folder, this one when started inside it).
if _sys.path and _os.path.realpath(_sys.path[0] or _os.curdir) == _os.path.dirname(_os.path.realpath(__file__)):
    del _sys.path[0]

# torch's OpenMP threads (libgomp on Linux) spin about 300,000 times at each barrier before they sleep: with every
# core given to torch (faceage.training.pin_threads), another busy process on one of those cores made each thread
# wait out the other's time slices, and a ResNet-18 step took 3x as long beside one busy process (and 4-15x on a
# loaded machine). A short spin keeps the idle speed (benchmarks/bench_omp_wait.py, round 35: idle 0.96x, beside one
# busy process 0.77x of the default's step time). libgomp reads it once, when torch first loads: set before that
# import here, kept where the user set it (GOMP_SPINCOUNT, or OMP_WAIT_POLICY, which decides the spin itself).
OMP_SPIN_COUNT = "10000"
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", OMP_SPIN_COUNT)
