"""Training: expected-age classification over ages 0..100, exactly resumable, distributed, tracked in MLflow.

Input: the ``preprocess`` output folder and :class:`TrainParams`. Outputs:

- the best checkpoint by validation MAE (self-describing, see :mod:`faceage.model`);
- ``history.csv`` (one row per epoch, results only; ``lr`` is the rate the epoch started with) and
  ``metrics.json`` (``best_val_mae``: the shipped network's validation MAE, which :func:`finalize` may have
  mixed with the pretrained one; ``best_epoch_val_mae``: the best epoch's own);
- ``model_summary.txt`` and a ``run.json`` naming the MLflow run, which ``evaluate`` and packaging continue.

The loop is split the torchvision-references way: :func:`train_one_epoch`, :func:`evaluate`, and
:func:`save_state` / :func:`load_state` of one :class:`TrainState`. Extension points for other
recipes: :func:`build_optimizer` (param groups), :func:`make_loss` (extra loss terms that may run
a second network on the batch), :func:`finalize` (a post-training step before the checkpoint is
saved); ``train.epochs=0`` evaluates and packages the initial weights. ``dlib_age`` fine-tuning
(:mod:`faceage.finetune`) plugs into exactly these: frozen stages and layer-wise learning rates
in the optimiser, distillation toward the pretrained network in the loss, WiSE-FT in
:func:`finalize`, and frozen early stages computed once (:class:`faceage.finetune.FrozenPrefixCache`).

Exact resume. The state is written atomically after every epoch (write a temporary file, fsync,
rename) and deleted only after every output exists and the MLflow run is finished, so ``kill -9``
at any point loses at most the running epoch. Nothing random is carried between epochs: epoch
``e`` reseeds Python, NumPy and torch from ``(seed, e, rank)``, the sampler's order is a function
of ``(seed, e)``, and each sample's augmentation, mirror-view choice and label jitter come from a
generator seeded by ``(seed, e, index)``. So a resumed epoch draws exactly what the uninterrupted
one drew, whatever the number of loader workers (their own seeds never reach the data, and come from
the loader's own generator, so that drawing them leaves the global stream that dropout reads alone),
and on CPU the resumed run ends with bit-identical weights, history and metrics. The state is
fingerprinted by the params (but ``num_workers`` and ``device``, which say where and how fast it runs: a rerun with
other ones resumes; a move between CPU and CUDA can change the last digits, AMP and TF32), the data and the pretrained weights' bytes (not the code: a rerun at another
commit resumes, unless that commit's network or parameter groups no longer fit the state, which is then ignored
with a warning); its MLflow run, when deleted or not in the current store, is replaced by a new one that gets the
saved epochs' metrics.

Distributed. ``torchrun --nproc_per_node=N stages/train.py ...`` (or ``--nnodes`` with a
rendezvous) runs :class:`~torch.nn.parallel.DistributedDataParallel` (gloo on CPU, nccl on CUDA);
a plain process is rank 0 of 1 and takes the same path. ``train.batch_size`` is the global batch:
each of N ranks gets ``batch_size / N`` samples, interleaved from the same permutation, so a
global step sees the same faces whatever N is; BatchNorm is synchronised across ranks. Rank 0
alone evaluates, logs, writes files and talks to MLflow; when it fails there (a divergence, a full disk),
every rank stops with it (:meth:`Distributed.together`). Resuming needs ``state_path`` readable
by every rank (one machine, or a shared filesystem).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from faceage import finetune
from faceage.chips import DLIB_AGE
from faceage.atomic import replacing, write_text
from faceage.config import ConfigError, TrainParams
from faceage.cores import usable_cores
from faceage.data import load_split
from faceage.detector import AGE_MODEL_FILE, RECOGNITION_FILE
from faceage.dlib_age import HEAD_FUSED
from faceage.download import file_digest
from faceage.errors import FaceAgeError
from faceage.face_encoder import FACE_ENCODER
from faceage.inference import input_fn, predict_logits
from faceage.inputs import DLIB_CHIP_PAIR, backbone_input
from faceage.model import (
    MAX_AGE, MIN_AGE, PretrainedWeightsError, build_model, check_input_size, expected_age, fit_temperature, input_stats,
    load_pretrained, save_checkpoint,
)
from faceage.preprocess import MANIFEST, read_crop_settings
from faceage.sources import weights_file
from faceage.tracking import (
    DVC_EXPERIMENT_TAG, RESUMED_AT_COMMIT_TAG, display_uri, git_commit, lost_run, mlflow_env, setup_mlflow,
    write_run_file,
)
from faceage.transforms import train_augment

log = logging.getLogger(__name__)

# history.csv holds results only: a resumed run must reproduce it byte for byte, and wall-clock
# figures measure the machine, not the model. Timing goes to MLflow (images_per_s, elapsed_s)
# and to metrics.json (train_time_s).
HISTORY_COLUMNS = ("epoch", "train_loss", "train_mae", "val_mae", "lr")
TIMING_COLUMNS = ("images_per_s", "elapsed_s")

# (logits, targets, network inputs) -> scalar loss. The inputs let a loss term run a second
# network (e.g. a frozen teacher) on the same batch.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def select_device(choice: str) -> torch.device:
    """``auto`` -> cuda > mps > cpu; an explicit choice that is unavailable raises ConfigError."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available; use train.device=auto or cpu")
    if choice == "mps" and not has_mps:
        raise ConfigError("train.device=mps but MPS is not available; use train.device=auto or cpu")
    return torch.device(choice)


def check_process_count(p: TrainParams, nproc: int, setting: str, *, warn: bool = True) -> None:
    """``nproc`` training processes on this machine, checked before any starts (or joins the process group).

    On CUDA each rank takes one GPU (``cuda:<local rank>``): more ranks than visible GPUs failed in every extra
    rank with torch's "invalid device ordinal" traceback. On CPU (gloo) more ranks than cores (its affinity, a
    container's CPU quota: :func:`faceage.cores.usable_cores`) each get one torch thread and share the cores:
    training ran many times slower, without a word; ``warn`` says so once.

    Args:
        p: The ``train`` params (``device``).
        nproc: The processes on this machine.
        setting: What set ``nproc``, as the message names it (``train.nproc_per_node=4``).
        warn: Log the CPU warning (the one process of the machine that says it).

    Raises:
        ConfigError: More CUDA processes than visible GPUs.
    """
    if nproc <= 1:
        return
    device = select_device(p.device)
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            picked = " (train.device=auto picked cuda)" if p.device == "auto" else ""
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ConfigError(f"{setting} starts {nproc} training processes on CUDA{picked}, one GPU each, but "
                              f"{gpus} GPU(s) are visible"
                              f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}: "
                              f"use at most {gpus} process(es), or train.device=cpu")
    elif device.type == "cpu" and warn:
        cores = usable_cores()
        if nproc > cores:
            log.warning("%s starts %d training processes on CPU, but this process may use %d CPU core(s) "
                        "(os.sched_getaffinity and any container CPU quota; os.cpu_count()=%s): they share the cores, "
                        "which trains many times slower than fewer processes; use at most %d", setting, nproc,
                        cores, os.cpu_count(), cores)


def pin_threads() -> int:
    """Torch threads for this process: its cores shared among the ranks on this machine.

    torchrun sets ``LOCAL_WORLD_SIZE``; 2 cores and 2 ranks give 1 thread each (more would
    oversubscribe: ResNet-18 ran 6x slower). Data-loader workers get one thread each.
    """
    threads = _cores_per_rank()
    torch.set_num_threads(threads)
    return threads


def _cores_per_rank() -> int:
    """The cores this process may use (:func:`faceage.cores.usable_cores`: its affinity, a container's
    CPU quota), shared among torchrun's ranks on this machine (``LOCAL_WORLD_SIZE``)."""
    return max(1, usable_cores() // max(1, env_int("LOCAL_WORLD_SIZE", 1)))


def env_int(name: str, default: int) -> int:
    """The whole number in the environment variable ``name`` (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``), or ``default`` where it is unset or empty.

    Raises:
        ConfigError: It is set to something else (by another tool, or by hand): was int()'s ValueError traceback.
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"the environment variable {name}={text!r} is not a whole number: torchrun sets it for "
                          f"its processes; unset it (unset {name}) to train in one process") from None


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class TrainingDivergedError(FaceAgeError, RuntimeError):
    """An epoch's loss or validation MAE is not a number: the weights diverged."""


class RankFailedError(FaceAgeError, RuntimeError):
    """Under torchrun, another rank failed (its own log line says why): this one stops with it."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job; a plain process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(env_int("RANK", 0), env_int("WORLD_SIZE", 1), env_int("LOCAL_RANK", 0))

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @contextmanager
    def together(self) -> Iterator[None]:
        """Runs a block after which every rank goes on only if none failed in it; a barrier at its end.

        Rank 0 alone checks, writes and logs: its error (a divergence, a full disk, MLflow) left the other ranks in
        the next collective, where gloo failed them with its "Connection closed by peer" traceback (NCCL waits out
        its timeout) above the error. Now each rank's outcome is shared at the block's end: a rank that failed
        raises its own error, the others stop with it, a divergence as the same :class:`TrainingDivergedError`,
        anything else as :class:`RankFailedError` naming the rank and its error.
        """
        if self.world_size == 1:
            yield
            return
        error = None
        try:
            yield
        except Exception as e:  # (not Ctrl-C: it reaches every rank of the terminal's process group itself)
            error = e
        outcomes: list[Any] = [None] * self.world_size
        dist.all_gather_object(outcomes, None if error is None else
                               (type(error).__name__, str(error), isinstance(error, TrainingDivergedError)))
        if error is not None:
            raise error
        failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
        if failed:
            rank, (kind, message, diverged) = failed[0]
            if diverged:
                raise TrainingDivergedError(message)
            raise RankFailedError(f"train: rank {self.rank} stopped because rank {rank} failed: {kind}: {message}")

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sums per-rank values over all ranks (identity for one process)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def init_distributed(p: TrainParams) -> tuple[Distributed, torch.device]:
    """Joins the torchrun process group if there is one; returns the rank info and this rank's device."""
    d = Distributed.from_env()
    device = select_device(p.device)
    if d.world_size > 1:
        if p.batch_size % d.world_size:
            raise ConfigError(f"train.batch_size={p.batch_size} (the global batch) must be divisible by the "
                              f"{d.world_size} processes")
        # Each rank, before it joins the group (stages/train.py checked before it relaunched, and warned): a
        # torchrun started with more ranks than GPUs failed in torch.cuda.set_device, "invalid device ordinal".
        local = env_int("LOCAL_WORLD_SIZE", d.world_size)
        check_process_count(p, local, f"torchrun --nproc_per_node={local}", warn=False)
        if device.type == "cuda":
            device = torch.device("cuda", d.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def age_loss(logits: torch.Tensor, target: torch.Tensor, kind: str, sigma: float,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Loss on 101-way logits for target ages (years); ``weight``: one per face (mean over faces by default).

    ``expectation_l1``: |E[age] - target| (the tutorial's loss).
    ``label_distribution``: KL(N(target, sigma) || softmax) + |E[age] - target| (DLDL-v2).

    Targets are taken within the model's ages (0..100: a 116-year-old is 100 to it), and the target
    distribution is normalised in log space: a target ~14 sigma from every age the model has (116 at
    sigma 1, or 30.5 at sigma 0.03) underflowed to 0 / 0 = NaN in float32, and training went on in NaN.
    """
    target = target.clamp(MIN_AGE, MIN_AGE + logits.shape[1] - 1)
    mean, _ = expected_age(logits)
    loss = (mean - target).abs()
    if kind == "label_distribution":
        ages = torch.arange(MIN_AGE, MIN_AGE + logits.shape[1], device=logits.device, dtype=torch.float32)
        log_q = -((ages[None, :] - target[:, None].float()) ** 2) / (2 * sigma**2)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
        log_p = torch.log_softmax(logits.float(), dim=1)
        loss = loss + (log_q.exp() * (log_q - log_p)).sum(dim=1)
    return (loss * weight).mean() if weight is not None else loss.mean()


# Bandwidth (years) of the Gaussian kernel that smooths the training ages' histogram for train.age_balance
# (label distribution smoothing: Yang et al., "Delving into Deep Imbalanced Regression", ICML 2021).
BALANCE_SIGMA = 2.0


def age_index(ages: torch.Tensor) -> torch.Tensor:
    """Ages (years, possibly jittered) -> the index of the nearest whole age in MIN_AGE..MAX_AGE."""
    return ages.round().long().clamp(MIN_AGE, MAX_AGE) - MIN_AGE


def age_balance_weights(ages: torch.Tensor, power: float, sigma: float = BALANCE_SIGMA) -> torch.Tensor:
    """Weight of a face at each whole age 0..MAX_AGE: (kernel-smoothed density of ``ages``) ** -power,
    scaled so the training faces' mean weight is 1. ``power`` 0 gives all ones.

    A label above ``MAX_AGE`` counts as ``MAX_AGE``, as the loss reads it: its density was taken at its own age
    (116) and its weight looked up at 100, far from it, where the floor made it nearly all the batch's weight."""
    ages = ages.clamp(MIN_AGE, MAX_AGE)
    grid = torch.arange(MIN_AGE, MAX_AGE + 1, dtype=torch.float64)
    density = torch.exp(-0.5 * ((grid[:, None] - ages.double()[None, :]) / sigma) ** 2).sum(dim=1)
    weight = density.clamp_min(density.max() * 1e-6) ** -power
    return (weight / weight[age_index(ages)].mean()).float()


def check_finite_weights(model: nn.Module, p: TrainParams, weights_from: str) -> None:
    """Refuses pretrained weights that hold NaN or infinite values (a diverged network's, saved as a weights file).

    They trained a whole epoch and then stopped with :func:`check_epoch`'s "lower train.lr, or check the labels",
    which no lower rate fixes; with ``train.epochs=0`` the NaN network was shipped. Checked before the data load and
    the MLflow run, as the other unusable ``train.pretrained`` values are.

    Raises:
        faceage.model.PretrainedWeightsError: A weight is not a finite number.
    """
    if p.pretrained == "none":  # (a random initialisation is finite)
        return
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise PretrainedWeightsError(
            f"train.pretrained={p.pretrained!r}: {len(bad)} tensor(s) of the loaded weights ({weights_from}) hold NaN "
            f"or infinite values ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): a diverged network's "
            "weights; use other weights, or train.pretrained=none to train from scratch")


def run_name(p: TrainParams) -> str:
    """The MLflow run's name: the backbone, what it reads, the epochs (``resnet18-224px-30ep``).

    ``train.image_size`` sizes a CNN's crops only: dlib's networks read their own chips and the run
    was named ``dlib_age-224px-30ep`` whatever they read. ``dlib_age`` names its head instead
    (``dlib_age-fused-30ep``; ``dlib_age-pretrained-0ep``, the zero-shot network), ``dlib_face`` its descriptors.
    """
    if p.backbone == DLIB_AGE:
        reads = finetune.resolve_head(p)
    elif p.backbone == FACE_ENCODER:
        reads = "descriptors"
    else:
        reads = f"{p.image_size}px"
    return f"{p.backbone}-{reads}-{p.epochs}ep"


def check_batch(p: TrainParams, model: nn.Module, world_size: int) -> None:
    """Refuses a per-process batch of one face for a model with BatchNorm layers (what it trains).

    ``train.batch_size`` 1 (or equal to ``nproc_per_node``) passes the config, which cannot know the model:
    dlib's heads train with it, a CNN failed in its first step with torch's "Expected more than 1 value per
    channel" traceback, after the MLflow run was created.

    Raises:
        FaceAgeError: ``model`` has BatchNorm layers and a process's batch is one face.
    """
    per_process = p.batch_size // world_size
    if p.epochs > 0 and per_process < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise FaceAgeError(f"train.batch_size={p.batch_size} gives {per_process} face per batch and process "
                           f"({world_size} process(es)); {p.backbone}'s BatchNorm layers need at least 2: raise "
                           "train.batch_size")


def make_loss(p: TrainParams, model: nn.Module, train_ages: torch.Tensor) -> LossFn:
    """The training loss: each face weighted by ``train.age_balance`` (:func:`age_balance_weights` of the
    training ages); with ``train.distill_weight`` > 0, plus distillation toward a frozen copy of ``model``
    (as it is now, i.e. pretrained) evaluated on the same inputs (:class:`faceage.finetune.Distillation`);
    with an ensemble head and ``train.ensemble_distill`` > 0, plus distillation toward the frozen
    network's own distribution on the same inputs."""
    table = age_balance_weights(train_ages, p.age_balance) if p.age_balance > 0 else None

    def fit(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = None if table is None else table.to(target.device)[age_index(target)]
        return age_loss(logits, target, p.loss, p.label_sigma, weight)

    distill = None
    top = finetune.distill_open_top(p)
    if p.distill_weight > 0:
        distill = finetune.Distillation(model, p.distill_weight, open_top=top)
    elif p.ensemble_distill > 0 and finetune.ensemble_of(model) is not None:
        distill = finetune.Distillation(model, p.ensemble_distill, zero_shot=True, open_top=top)
    if distill is not None:
        return lambda logits, target, inputs: fit(logits, target) + distill(logits, inputs)
    return lambda logits, target, _inputs: fit(logits, target)


def lr_factor(step: int, steps_per_epoch: int, p: TrainParams) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine / step decay / constant."""
    # A warm-up as long as the run or longer would never reach train.lr: it takes at most half the run.
    warmup = min(p.warmup_epochs * steps_per_epoch, p.epochs * steps_per_epoch // 2)
    total = p.epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if p.scheduler == "cosine":
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if p.scheduler == "step":
        # x0.1 at half and at three quarters of the run, never at its first epoch (short runs: int()
        # put both at epoch 0, so a 1-epoch run trained at a hundredth of train.lr)
        epoch = step // steps_per_epoch
        return 0.1 ** sum(epoch >= m for m in {max(int(p.epochs * 0.5), 1), max(int(p.epochs * 0.75), 1)})
    return 1.0


def build_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    """The optimiser over ``model``'s trainable parameters: frozen stages left out, layer-wise learning
    rates (:func:`faceage.finetune.param_groups`; one group for every backbone but ``dlib_age``)."""
    params = finetune.param_groups(model, p)
    if p.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    if p.optimizer == "sgd":
        return torch.optim.SGD(params, lr=p.lr, momentum=0.9, nesterov=True, weight_decay=p.weight_decay)
    raise ConfigError(f"train.optimizer must be 'adamw' or 'sgd', got {p.optimizer!r}")


def build_scheduler(opt: torch.optim.Optimizer, steps_per_epoch: int, p: TrainParams):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps_per_epoch, p))


# What each of _mix's seeds is for. SeedSequence pads its entropy with zeros, so _mix(42, 3) and _mix(42, 3, 0) were
# one seed: rank 0's global stream in an epoch (which dropout reads) was the stream that shuffled that epoch's data
# and the one face 0's augmentation drew from, and under torchrun rank r's was face r's.
EPOCH_STREAM, ORDER_STREAM, SAMPLE_STREAM = 1, 2, 3


def _mix(purpose: int, *values: int) -> int:
    """A 63-bit seed for ``purpose`` (one of the ``*_STREAM`` constants) from integers: SeedSequence hashing,
    so nearby inputs give unrelated seeds, and the purpose and the count of values keep streams apart."""
    entropy = [purpose, len(values), *values]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseeds every global stream (Python, NumPy, torch CPU and CUDA) for one epoch of one rank."""
    s = _mix(EPOCH_STREAM, seed, epoch, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


class EpochSampler(DistributedSampler):
    """This rank's share of the epoch's permutation, as ``(index, epoch)`` keys.

    The permutation depends on ``(seed, epoch)`` only, hashed (:func:`_mix`): torch's own sampler seeds it
    with ``seed + epoch``, so seed 43's epoch 1 was seed 42's epoch 2 and a seed sweep's runs shared their
    data orders. Rank r of N takes every N-th index from r, so consecutive global batches hold the same
    faces for any N. The epoch travels with each key so that loader workers, persistent or not, seed the
    sample's randomness without shared state.
    """

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(_mix(ORDER_STREAM, self.seed, self.epoch))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.drop_last:
            order = order[:self.total_size]
        else:  # as torch pads: repeat the order's start until every rank has num_samples
            order = (order * math.ceil(self.total_size / max(n, 1)))[:self.total_size]
        return ((i, self.epoch) for i in order[self.rank:self.total_size:self.num_replicas])


def _jitter(age: torch.Tensor, age_std: torch.Tensor) -> torch.Tensor:
    """A draw from N(age, age_std) whose deviation is cut at the nearer end of MIN_AGE..MAX_AGE, on both sides.

    Cutting symmetrically keeps the draw's mean at ``age``: clamping the draw to [0, 100] instead raised a
    1-year-old's mean target to 1.6 years when the raters spread 3 years, teaching every baby older.
    """
    room = torch.minimum(age - MIN_AGE, MAX_AGE - age).clamp(min=0)
    return age + (age_std * torch.randn(())).clamp(-room, room)


class SeededSamples(Dataset):
    """Training items with their randomness (augmentation, view choice, label jitter) seeded per sample.

    Item ``(index, epoch)`` -> ``(input, target age, apparent age)``; the target is the apparent age,
    or with ``label_jitter`` a draw from N(apparent age, its std), cut symmetrically to stay in [0, 100].
    """

    def __init__(self, base: Dataset, seed: int, label_jitter: bool):
        self.base, self.seed, self.label_jitter = base, seed, label_jitter

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, epoch = key
        # fork_rng: the transforms draw from torch's global generator; leave the caller's untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(SAMPLE_STREAM, self.seed, epoch, index))
            x, age, age_std = self.base[index]
            target = _jitter(age, age_std) if self.label_jitter else age
        return x, target, age


@dataclass
class TrainState:
    """Everything a resumed run needs, saved after every finished epoch.

    ``history`` rows hold :data:`HISTORY_COLUMNS` plus :data:`TIMING_COLUMNS`; ``elapsed_s`` adds up
    over resumed runs. ``best_model`` is ``None`` until an epoch improves on the start. ``git_commit`` is
    HEAD when the run started (the checkpoint's and the MLflow tag's); ``resumed_at_commit`` HEAD of the
    latest resume that ran another commit, "" while none did. ``amp_consecutive_skips``: :attr:`Amp.consecutive_skips`
    at the epoch's end (a kill must not reset the divergence bound). ``params``: the ``train`` params it was
    written for, to name the keys that changed when a rerun cannot resume it (``{}`` in older states).
    """

    fingerprint: str
    run_id: str
    epoch: int = 0
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_mae: float = float("inf")
    best_epoch: int = 0
    best_model: dict[str, torch.Tensor] | None = None
    git_commit: str = ""  # "" in a state saved before it was kept: the run's git_commit tag is read instead
    resumed_at_commit: str = ""
    amp_consecutive_skips: int = 0
    params: dict[str, Any] = field(default_factory=dict)


def save_state(path: str | Path, state: TrainState) -> None:
    """Writes the state atomically: a kill leaves the previous state or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as f:  # a staging file of this call's own, removed when the write fails (a full disk)
        torch.save({f_.name: getattr(state, f_.name) for f_ in fields(TrainState)}, f)


def resume_message(epoch: int, epochs: int) -> str:
    """The log line of a resumed training: the state holds ``epoch`` finished epochs of ``epochs``.

    "resuming from epoch N of M" alone read as if epoch N were trained again; it finished and was saved, and training
    goes on with N+1. (The "resuming from epoch N of M" prefix stays: ``benchmarks/kill_resume.py`` and the tests
    read it.)

    Args:
        epoch: The last finished epoch (``TrainState.epoch``, at least 1).
        epochs: ``train.epochs``.

    Returns:
        ``"resuming from epoch 3 of 5 (epochs 1-3 done, not trained again; next: epoch 4)"``.
    """
    if epoch >= epochs:  # killed after the last epoch's save, before the run ended: only the end is left
        done = "epoch 1" if epochs == 1 else f"all {epochs} epochs"
        return f"resuming from epoch {epoch} of {epochs} ({done} done; no epoch left to train)"
    done = f"epoch {epoch}" if epoch == 1 else f"epochs 1-{epoch}"
    return f"resuming from epoch {epoch} of {epochs} ({done} done, not trained again; next: epoch {epoch + 1})"


def load_state(path: str | Path, fingerprint: str, params: dict[str, Any] | None = None) -> TrainState | None:
    """The saved state if it was written for these params and data, else ``None``; ``params`` (the current
    ``train`` params, ``asdict``) name what changed in the warning for a state that is ignored."""
    path = Path(path)
    if not path.exists():
        return None
    # Read first, decoded apart: an error reading the file (a shared filesystem away) is raised, while any
    # error decoding its bytes means another format or a file cut short. Those were caught by type, and a file
    # cut within its last bytes raised torch's OSError ("Invalid argument") on every rerun instead.
    blob = path.read_bytes()
    try:
        state = TrainState(**torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
    except Exception as e:  # the bytes are in memory: nothing but their decoding can fail
        log.warning("ignoring %s: unreadable (%s: %s)", path, type(e).__name__, e)
        return None
    if state.fingerprint != fingerprint:
        log.warning("ignoring %s (%d finished epoch(s) of MLflow run %s): it was written for other params or data%s; "
                    "training starts over", path, state.epoch, state.run_id or "-", _what_changed(state.params, params))
        return None
    return state


def _what_changed(saved: dict[str, Any], now: dict[str, Any] | None) -> str:
    """What differs between a state's ``train`` params and the current ones, as words: the changed keys, or that
    the params are the same (so the data or the pretrained weights changed); "" for a state without its params."""
    if not saved or now is None:  # a state saved before it kept its params
        return ""
    changed = [f"train.{k}={saved.get(k, 'unset')} (now {now.get(k, 'unset')})"
               for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k) and k not in EXECUTION_KEYS]
    if not changed:
        return " (the same params: the preprocess output, the embeddings or a pretrained weights file changed)"
    return f" ({', '.join(changed)})"


def _resume(state: TrainState, model: nn.Module, opt: torch.optim.Optimizer, sched, amp: Amp,
            state_path: Path) -> TrainState | None:
    """Loads a saved state's weights, optimiser, schedule and loss scaler; ``None``, with nothing loaded, when
    they do not fit this code's network.

    The fingerprint covers the params and the data, not the code, so a rerun at another commit resumes (and
    records ``resumed_at_commit``). A commit that changed the network's layers or the optimiser's parameter
    groups under the same params left a state that ``load_state_dict`` refused, with torch's traceback, at every
    rerun until the file was deleted by hand (and a refused load had already copied the layers that fit).
    """
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    why = next((f"{name}: {misfit}" for name, saved in (("weights", state.model), ("best epoch", state.best_model))
                if saved is not None and (misfit := _misfit(want, saved))), "")
    if not why:
        try:
            opt.load_state_dict(state.optimizer)  # checks its groups before it changes anything
        except (ValueError, KeyError) as e:
            why = f"optimizer: {e}"
    if why:
        log.warning("ignoring %s: it does not fit this code's network (%s); training starts over", state_path, why)
        return None
    model.load_state_dict(state.model)
    sched.load_state_dict(state.scheduler)
    if state.scaler:
        # A state saved where loss scaling was off (CPU, bf16) holds {}: an fp16 GPU's scaler refuses
        # it, and starts from its defaults instead.
        amp.scaler.load_state_dict(state.scaler)
    amp.consecutive_skips = state.amp_consecutive_skips
    return state


def _misfit(want: dict[str, tuple[int, ...]], saved: dict[str, torch.Tensor]) -> str:
    """How saved weights differ from a network's ``state_dict`` shapes (``want``): "" when they fit."""
    got = {k: tuple(v.shape) for k, v in saved.items()}
    if missing := sorted(want.keys() - got.keys()):
        return f"missing {missing[:3]}"
    if unexpected := sorted(got.keys() - want.keys()):
        return f"unexpected {unexpected[:3]}"
    if other := [k for k in want if want[k] != got[k]]:
        return f"other shapes {[(k, got[k], want[k]) for k in other[:3]]}"
    return ""


# The photos a run's ``best_val_mae`` was measured on (:func:`faces_fingerprint` of the ``valid`` split's scored
# file names, and their count). With ``preprocess.no_face=skip`` the split loses its faceless photos (which ones depend
# on the detector settings), and validation MAEs on other photos do not compare: the champion rule compares them only
# among runs validated on the same faces (:func:`faceage.packaging.rank_candidates`).
VAL_FACES_TAG = "train.val_faces_sha256"
VAL_N_FACES_TAG = "train.val_n_faces"


def faces_fingerprint(file_names: Iterable[str]) -> str:
    """sha256 of the sorted, distinct file names of the photos a metric was measured on: two runs' MAEs on one
    data version (``data_sha256``, ``evaluate.external_sha256``) compare only where this also matches."""
    return hashlib.sha256("\n".join(sorted(set(file_names))).encode("utf-8")).hexdigest()


def validation_faces_tags(rows: Sequence[dict]) -> dict[str, str]:
    """:data:`VAL_FACES_TAG` and :data:`VAL_N_FACES_TAG` of the validation split's manifest ``rows`` (those with a
    crop: the faces :func:`evaluate` scores)."""
    return {VAL_FACES_TAG: faces_fingerprint(r["file_name"] for r in rows), VAL_N_FACES_TAG: str(len(rows))}


# ``train`` keys that say where and how fast a run executes, not what it trains: each face's draws are seeded per
# face and epoch whatever loader worker makes them (SeededSamples), and a state saved on one device loads on any
# (weights and optimiser moved to it; a loss scaler's state is ignored where scaling is off). Fingerprinted, a run
# killed at epoch 29 of 30 and rerun with another num_workers, or train.device=cuda for auto on the same GPU,
# silently started over. (Not nproc_per_node: each rank's dropout stream is its own, and amp changes the numbers.)
EXECUTION_KEYS = ("num_workers", "device")


def _fingerprint(p: TrainParams, faces_dir: Path, embeddings_path: str | Path | None,
                 weight_files: Sequence[Path] = ()) -> str:
    """What a saved state must have been trained from to be resumed: the params but :data:`EXECUTION_KEYS` (read
    as their defaults: a state a default run saved before they left still matches), the data, and the bytes of
    the pretrained weights files (:func:`pretrained_files`; new weights at the same path start over)."""
    defaults = {f.name: f.default for f in fields(TrainParams) if f.name in EXECUTION_KEYS}
    h = hashlib.sha256(json.dumps(asdict(replace(p, **defaults)), sort_keys=True).encode())
    h.update(file_digest(faces_dir / MANIFEST).encode())
    if p.backbone in (FACE_ENCODER, DLIB_AGE) and embeddings_path is not None:
        h.update(file_digest(embeddings_path).encode())
    h.update(json.dumps(read_crop_settings(faces_dir), sort_keys=True).encode())
    for path in weight_files:
        h.update(file_digest(path).encode())
    return h.hexdigest()


def pretrained_files(p: TrainParams, head: str | None, detector_dir: str | Path | None) -> list[Path]:
    """The weights files :func:`faceage.model.load_pretrained` reads for ``train.pretrained``: a path's file;
    for ``dlib_age``, dlib's age network and, with the fused head, its face-recognition network. ``imagenet``
    gives none (torchvision's files are named by their own hash), nor does ``none``, nor ``dlib_face``
    (its frozen encoder's descriptors are the embed stage's output, fingerprinted as data)."""
    if p.pretrained == "none" or p.backbone == FACE_ENCODER:
        return []
    if p.backbone == DLIB_AGE:
        if detector_dir is None:  # (load_pretrained has refused it)
            return []
        folder = Path(detector_dir)
        return [folder / AGE_MODEL_FILE] + ([folder / RECOGNITION_FILE] if head == HEAD_FUSED else [])
    path = weights_file(p.pretrained, p.backbone)
    return [] if path is None else [path]


def count_gflops(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> float:
    """Forward-pass GFLOPs for one input (torch's FLOP counter: 2 per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros((1, *input_shape), device=device))
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def _loader_workers(p: TrainParams, device: torch.device) -> int:
    if p.num_workers >= 0:
        return p.num_workers
    cores = _cores_per_rank()
    # On a small CPU box, worker processes only steal cores from the forward/backward pass.
    return 0 if device.type == "cpu" and cores <= 4 else min(8, max(cores - 1, 1))


# fp16 steps in a row the loss scaler may skip before the run counts as diverged. A backward overflow halves the
# scale and recovers in at most log2(scale) skips: 16 from GradScaler's initial 2**16, 24 after growth to 2**24 (one
# doubling per 2000 clean steps). A forward overflow does not depend on the scale and, the step being skipped, the
# weights stay as they were: a transient one is an isolated batch. 50 in a row leaves a scale below 2**-26, and a
# network that skipped every step for two epochs of the 1,500-face sample (23 steps each at batch 64); it is also
# far below the ~165 halvings that take the float32 scale to 0, after which the scaler no longer skips anything.
MAX_CONSECUTIVE_SKIPPED_STEPS = 50


@dataclass
class Amp:
    """Mixed precision on CUDA (bf16 where the GPU runs it natively, else fp16 with loss scaling); off elsewhere.

    ``consecutive_skips`` counts the optimiser steps in a row that the fp16 loss scaler skipped, across epochs
    (:func:`check_amp_step`).
    """

    enabled: bool
    dtype: torch.dtype
    scaler: torch.amp.GradScaler
    consecutive_skips: int = 0

    @classmethod
    def for_device(cls, p: TrainParams, device: torch.device) -> Amp:
        enabled = p.amp and device.type == "cuda"
        # Native bf16 only (compute capability 8.0+): torch calls an older GPU's (a T4's, a V100's) bf16 supported
        # because it can emulate it, and train.amp then trained in bf16 those GPUs have no units for, instead of
        # in fp16 on their tensor cores (what the README promises there).
        native_bf16 = enabled and torch.cuda.is_bf16_supported(including_emulation=False)
        dtype = torch.bfloat16 if native_bf16 else torch.float16
        return cls(enabled, dtype, torch.amp.GradScaler("cuda", enabled=enabled and dtype == torch.float16))


def train_one_epoch(net: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, sched, loss_fn: LossFn,
                    prepare: Callable, device: torch.device, amp: Amp, d: Distributed) -> dict[str, float]:
    """One pass over this rank's share of the data; returns the global mean loss and MAE, and images seen.

    The pass stops at the first step whose counted loss is not a number (too high a ``train.lr``), that step's loss
    in the mean (``stopped_at_step``: its number, 1-based; 0 for a whole pass), for :func:`check_epoch` to stop the
    run: every later step only trained NaN weights, for minutes on CPU, before the epoch's end said so. The check
    reads the loss already read once per step for the mean (no extra sync); under DDP the ranks' verdicts are
    summed at each step (a tiny all-reduce), so that every rank stops at the same step: a rank that stopped alone
    left the others in the next step's collectives.
    """
    net.train()
    scaling = amp.scaler.is_enabled()
    seen, counted, loss_sum, mae_sum, skipped_steps, stopped_at, step = 0, 0, 0.0, 0.0, 0, 0, 0
    for step, (images, target, ages) in enumerate(loader, 1):
        images, target, ages = images.to(device), target.to(device), ages.to(device)
        x = prepare(images)
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
            logits = net(x)
        loss = loss_fn(logits, target, x)
        opt.zero_grad(set_to_none=True)
        scale = amp.scaler.get_scale() if scaling else 1.0  # a CPU-GPU sync point, once per step
        amp.scaler.scale(loss).backward()
        amp.scaler.step(opt)
        amp.scaler.update()
        sched.step()
        # The scaler skips a step whose gradients are not finite, and only then lowers its scale. With DDP the
        # gradients are all-reduced, so every rank sees the same skips and stops at the same step.
        skipped = scaling and amp.scaler.get_scale() < scale
        skipped_steps += skipped
        count, amp.consecutive_skips = check_amp_step(loss.detach(), skipped, amp.consecutive_skips, scaling=scaling)
        n = len(ages)
        seen += n
        diverged = False
        if count:
            value = loss.item()  # (the step's one read of the loss: the mean's, and the check's)
            counted += n
            loss_sum += value * n
            mae_sum += (expected_age(logits.detach())[0] - ages).abs().sum().item()
            diverged = not math.isfinite(value)
        if d.world_size > 1:
            diverged = d.sum([float(diverged)], device)[0] > 0
        if diverged:
            stopped_at = step
            break
    seen, counted, loss_sum, mae_sum = d.sum([seen, counted, loss_sum, mae_sum], device)
    # No counted step (every forward pass overflowed in fp16): no loss was measured, NaN says so.
    return {"train_loss": loss_sum / counted if counted else math.nan,
            "train_mae": mae_sum / counted if counted else math.nan,
            "seen": seen, "counted": counted, "skipped_steps": skipped_steps,
            "stopped_at_step": stopped_at, "steps": len(loader) if hasattr(loader, "__len__") else step}


def check_amp_step(loss: torch.Tensor, skipped: bool, consecutive: int, *, scaling: bool,
                   limit: int = MAX_CONSECUTIVE_SKIPPED_STEPS) -> tuple[bool, int]:
    """Decides what one optimiser step means for divergence.

    Without loss scaling (fp32, bf16) every loss counts: a non-finite one makes the epoch's mean non-finite, and
    :func:`check_epoch` stops the run. With fp16 loss scaling an overflowing step is normal: the scaler skipped it
    and lowered its scale, the weights are untouched. Its loss stays out of the epoch's mean when it is not finite
    (a forward overflow); a finite one (a backward overflow) is a real measurement and counts.

    Args:
        loss: The step's loss.
        skipped: Whether the loss scaler skipped the step (its scale went down).
        consecutive: Skipped steps in a row before this one.
        scaling: Whether fp16 loss scaling is on.
        limit: Skipped steps in a row that count as divergence (:data:`MAX_CONSECUTIVE_SKIPPED_STEPS`).

    Returns:
        ``(counted, consecutive)``: whether the loss enters the epoch's mean, and the skipped steps in a row now.

    Raises:
        TrainingDivergedError: ``limit`` steps in a row were skipped.
    """
    if not (scaling and skipped):
        return True, 0
    consecutive += 1
    if consecutive >= limit:
        raise TrainingDivergedError(
            f"{consecutive} consecutive fp16 steps overflowed (last loss {loss.item()}): loss scaling does not "
            "recover from this, the network no longer fits in fp16 (lower train.lr, check the labels, or set "
            "train.amp=false); nothing of this epoch is kept")
    return bool(torch.isfinite(loss).all()), consecutive


def check_epoch(epoch: int, train: dict[str, float], val_mae: float) -> None:
    """Stops the run when an epoch's training loss or validation MAE is not a number.

    An fp16 epoch whose every step the loss scaler skipped has no training loss (NaN, ``counted`` 0): its weights
    did not move, and :func:`check_amp_step` bounds such runs of skips. An epoch that :func:`train_one_epoch` stopped
    at its first non-finite loss (``stopped_at_step``) is named with that step.

    Raises:
        TrainingDivergedError: the weights diverged.
    """
    measured = train.get("counted", 1) > 0
    if not ((math.isfinite(train["train_loss"]) or not measured) and math.isfinite(val_mae)):
        stopped = train.get("stopped_at_step", 0)
        where = (f" (the epoch stopped at step {stopped} of {train.get('steps', '?')}, the first whose loss was not "
                 "a number)" if stopped else "")
        raise TrainingDivergedError(
            f"epoch {epoch}: training loss {train['train_loss']}, validation MAE {val_mae}: the weights are "
            f"no longer numbers (lower train.lr, or check the labels); nothing of this epoch is kept{where}")


def val_errors(model: nn.Module, val_set: Dataset, prepare: Callable, device: torch.device) -> torch.Tensor:
    """Per-face absolute errors (years) of the expected age on the validation split."""
    pred, _ = expected_age(predict_logits(model, val_set.images, prepare, device))
    return (pred - val_set.ages).abs()


def evaluate(model: nn.Module, val_set: Dataset, prepare: Callable, device: torch.device) -> float:
    """Validation MAE (years) of the expected age."""
    return val_errors(model, val_set, prepare, device).mean().item()


def finalize(model: nn.Module, state: TrainState, val_set: Dataset, prepare: Callable,
             device: torch.device, p: TrainParams, pretrained: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Turns the trained network into the one to ship; returns checkpoint metadata it adds.

    Loads the best epoch's weights (the initial ones when no epoch ran); with ``train.wise_ft``,
    interpolates them with the ``pretrained`` weights, the mix chosen on validation
    (:func:`faceage.finetune.interpolate_weights`); with ``dlib_age``'s ensemble head, mixes its
    distribution with the pretrained network's, also chosen on validation
    (:func:`faceage.finetune.choose_ensemble_weight`); then calibrates the predicted spread on
    validation (the mean is unaffected). A mix sets ``state.best_val_mae`` to the shipped network's
    validation MAE (the caller keeps the best epoch's own as ``best_epoch_val_mae``).
    """
    if state.best_model is not None:
        model.load_state_dict(state.best_model)
    extra: dict[str, Any] = {}
    if p.wise_ft and p.epochs > 0:
        alpha, wise_mae, _ = finetune.interpolate_weights(model, pretrained,
                                                          lambda: val_errors(model, val_set, prepare, device))
        state.best_val_mae = wise_mae
        extra.update(wise_alpha=alpha, wise_val_mae=wise_mae)
    if finetune.ensemble_of(model) is not None:
        weight, mix_mae, _ = finetune.choose_ensemble_weight(model, lambda: val_errors(model, val_set, prepare, device),
                                                             p.ensemble_weight)
        state.best_val_mae = mix_mae
        extra.update(ensemble_weight=weight, ensemble_val_mae=mix_mae)
    extra["temperature"] = fit_temperature(predict_logits(model, val_set.images, prepare, device), val_set.ages)
    return extra


def train_model(p: TrainParams, faces_dir: str | Path, model_path: str | Path, reports_dir: str | Path,
                run_path: str | Path, state_path: str | Path, embeddings_path: str | Path | None = None,
                detector_dir: str | Path | None = None) -> dict:
    """Trains, validates each epoch, keeps the best checkpoint, logs everything to MLflow.

    Under torchrun every rank calls this; rank 0 writes the outputs and returns the result,
    the others return ``{}``.

    Args:
        p: The ``train`` section of ``params.yaml``.
        faces_dir: ``preprocess`` output.
        model_path: Where the best checkpoint goes.
        reports_dir: Where ``history.csv``, ``metrics.json`` and ``model_summary.txt`` go.
        run_path: Where the MLflow run id is written.
        state_path: The resumable state file (deleted after a completed run).
        embeddings_path: The ``embed`` stage's features (descriptors for ``dlib_face``, chips for ``dlib_age``).
        detector_dir: The ``fetch_detector`` folder (``dlib_age``'s pretrained weights).

    Returns:
        ``{"best_val_mae": ..., "best_epoch": ..., "best_epoch_val_mae": ..., "epochs": ..., "train_time_s": ...,
        "run_id": ...}``: ``best_val_mae`` is the shipped network's (see :func:`finalize`), ``best_epoch_val_mae``
        the best epoch's own.

    Raises:
        faceage.model.PretrainedWeightsError: ``train.pretrained`` weights are unreachable, or hold NaN or infinite
            values (:func:`check_finite_weights`).
        TrainingDivergedError: An epoch's loss or validation MAE, or with ``train.epochs=0`` the initial network's
            validation MAE, is not a number.
    """
    faces_dir, reports_dir, state_path = Path(faces_dir), Path(reports_dir), Path(state_path)
    # Before joining the process group: a rank that raised after joining left the others in gloo's
    # "Connection closed by peer" traceback, above or instead of the ConfigError.
    finetune.check_params(p)
    d, device = init_distributed(p)
    try:
        return _train(p, d, device, faces_dir, Path(model_path), reports_dir, Path(run_path), state_path,
                      embeddings_path, detector_dir)
    finally:
        if d.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(p: TrainParams, d: Distributed, device: torch.device, faces_dir: Path, model_path: Path,
           reports_dir: Path, run_path: Path, state_path: Path, embeddings_path: str | Path | None,
           detector_dir: str | Path | None) -> dict:
    threads = pin_threads()
    torch.manual_seed(p.seed)  # the initial weights: the same on every rank and in every resumed run
    crop = read_crop_settings(faces_dir)
    head = finetune.resolve_head(p)
    model = build_model(p.backbone, head=head, face_features=p.face_features)
    check_input_size(model, p.backbone, p.image_size)  # before the data load: seconds, not minutes
    weights_from = load_pretrained(model, p.backbone, p.pretrained, model_dir=detector_dir)
    check_finite_weights(model, p, weights_from)
    if p.epochs == 0 and p.backbone != DLIB_AGE:
        # Only dlib_age brings an age head of its own; any other backbone's is new. Shipped without a word, its ages
        # came from random weights, and the run looked like a zero-shot baseline.
        log.warning("train.epochs=0 with train.backbone=%s: its age head is new and untrained (random weights; "
                    "%s), so the model evaluated and shipped guesses ages; epochs=0 is the zero-shot model of "
                    "train.backbone=%s, whose head is dlib's", p.backbone, weights_from, DLIB_AGE)
    if head is not None:
        weights_from += f"; head: {head} (train.head={p.head})"
    if d.world_size > 1:
        # Batch statistics over the global batch, as in a single process.
        _set_batchnorm_class(model, GlobalBatchNorm2d)
    model.to(device)
    pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}  # for WiSE-FT
    kind = backbone_input(p.backbone, head)
    pairs = kind == DLIB_CHIP_PAIR
    train_set = load_split(faces_dir, "train", p.backbone, p.image_size, embeddings_path,
                           transform=train_augment(augment=p.augment, low_res=p.low_res, low_res_min=p.low_res_min),
                           augment=p.augment, pairs=pairs)
    val_set = load_split(faces_dir, "valid", p.backbone, p.image_size, embeddings_path, pairs=pairs)
    mean, std = input_stats(p.backbone)
    prepare = input_fn(kind, mean, std)
    full = (model, val_set, prepare)  # what the checkpoint, the summary and the logged model describe
    input_shape = tuple(val_set.images.shape[1:])
    encoder_info = train_set.info if p.backbone in (FACE_ENCODER, DLIB_AGE) else None  # the features' lineage
    if p.epochs > 0 and len(train_set) < 2 * d.world_size:
        # A batch of one face fails in BatchNorm ("Expected more than 1 value per channel"), and one
        # face teaches nothing: say so instead. After the data load (a missing input is named first, as the
        # stage's own error), before dlib_age's frozen-stage cache (an ONNX export and a pass over every chip),
        # which kept the user waiting for this line.
        raise FaceAgeError(f"train: {len(train_set)} training face(s) in {faces_dir} ({d.world_size} process(es)); "
                           f"training needs at least {2 * d.world_size}: check preprocess's report "
                           "(reports/preprocess.json), or set train.epochs=0 for the zero-shot dlib_age model")
    cache = finetune.prefix_cache(model, train_set, val_set, prepare, p, device)
    if cache is not None:  # frozen early stages computed once; the loop trains the rest on their outputs
        model, train_set, val_set, prepare = cache.training_view()
    check_batch(p, model, d.world_size)
    workers = _loader_workers(p, device)
    drop_last = len(train_set) > p.batch_size
    sampler = EpochSampler(train_set, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=p.seed,
                           drop_last=drop_last)
    # The loader's own generator: each new iterator draws its workers' base seed from it. From torch's
    # global stream that draw moved the dropout masks that follow: with persistent workers it happens
    # once per process, so a resumed run drew once more than the uninterrupted one, and 0 workers (a
    # draw every epoch) trained other weights than 1. The base seed never reaches the data (SeededSamples).
    loader = DataLoader(SeededSamples(train_set, p.seed, p.label_jitter), batch_size=p.batch_size // d.world_size,
                        sampler=sampler, drop_last=drop_last, num_workers=workers, worker_init_fn=_worker_init,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(p.seed))
    opt = build_optimizer(model, p)
    sched = build_scheduler(opt, len(loader), p)
    amp = Amp.for_device(p, device)
    loss_fn = make_loss(p, model, train_set.ages)

    fingerprint = _fingerprint(p, faces_dir, embeddings_path, pretrained_files(p, head, detector_dir))
    state = load_state(state_path, fingerprint, asdict(p))
    if state is not None and state.epoch > 0:  # (epoch 0: the run started, the initial weights are seeded)
        state = _resume(state, model, opt, sched, amp, state_path)
        if state is not None:
            log.info("%s (%s)", resume_message(state.epoch, p.epochs), state_path)
    net = nn.parallel.DistributedDataParallel(model) if d.world_size > 1 else model

    tracker = _Tracker(p, d, crop, device, workers, threads, fingerprint, state, state_path)
    with ExitStack() as run:
        with d.together():  # rank 0's MLflow run started (or not: every rank stops), before any rank trains
            state = run.enter_context(tracker.run())
            if d.is_main:
                _write_summary(reports_dir, full[0], p, weights_from, tracker)
                # Each start and resume: a run trained before the tag existed and resumed now gets it too
                tracker.mlflow.set_tags(validation_faces_tags(full[1].rows))
                tracker.log_gflops(count_gflops(full[0], input_shape, device))
                log.info("training %s (weights: %s) on %s: %d train / %d valid faces, %d epochs, global batch %d "
                         "over %d process(es), %d loader workers, %d torch threads each; MLflow run %s in %s",
                         p.backbone, weights_from, device, len(train_set), len(val_set), p.epochs, p.batch_size,
                         d.world_size, workers, threads, state.run_id, display_uri())
        for epoch in range(state.epoch + 1, p.epochs + 1):
            t0 = time.time()
            seed_epoch(p.seed, epoch, d.rank)
            sampler.set_epoch(epoch)
            # train.lr's schedule at the epoch's first step (the last group: the head; layer-wise rates scale
            # the groups below it), read before the scheduler steps after each batch: read after them, the
            # column was the next epoch's rate, and the last epoch's the schedule's end, 0 under cosine
            lr = opt.param_groups[-1]["lr"]
            train = train_one_epoch(net, loader, opt, sched, loss_fn, prepare, device, amp, d)
            train_s = time.time() - t0
            # No rank starts the next epoch before rank 0 has checked and saved this one; its failure (a divergence)
            # stops every rank with its one line.
            with d.together():
                if d.is_main:
                    val_mae = evaluate(model, val_set, prepare, device)
                    elapsed = (state.history[-1]["elapsed_s"] if state.history else 0.0) + time.time() - t0
                    row = {"epoch": epoch, **{k: train[k] for k in ("train_loss", "train_mae")}, "val_mae": val_mae,
                           "lr": lr, "images_per_s": train["seen"] / train_s, "elapsed_s": elapsed}
                    log.info("epoch %d/%d  loss %.4f  train MAE %.2f  val MAE %.2f  lr %.2e  %.0f img/s  %.0f s",
                             epoch, p.epochs, row["train_loss"], row["train_mae"], val_mae, row["lr"],
                             row["images_per_s"], elapsed)
                    check_epoch(epoch, train, val_mae)
                    if amp.scaler.is_enabled():  # fp16: the steps the loss scaler skipped (overflow), an MLflow metric
                        row["amp_skipped_steps"] = train["skipped_steps"]
                        if train["skipped_steps"]:
                            log.warning("epoch %d: the fp16 loss scaler skipped %d step(s) on overflow (loss scale now "
                                        "%g; train.amp=true)", epoch, train["skipped_steps"], amp.scaler.get_scale())
                    state.history.append(row)
                    if val_mae < state.best_val_mae:
                        state.best_val_mae, state.best_epoch = val_mae, epoch
                        state.best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    state.epoch = epoch
                    state.model, state.optimizer = model.state_dict(), opt.state_dict()
                    state.scheduler, state.scaler = sched.state_dict(), amp.scaler.state_dict()
                    state.amp_consecutive_skips = amp.consecutive_skips
                    save_state(state_path, state)  # the commit point of an epoch
                    _write_history(reports_dir / "history.csv", state.history)
                    tracker.log_epochs()
        if not d.is_main:
            return {}
        if p.epochs == 0:
            state.best_val_mae = evaluate(model, val_set, prepare, device)
            # No epoch ran, so check_epoch never looked: finite weights whose outputs overflow (NaN weights are
            # refused at the load) were shipped, "best_val_mae": NaN (not JSON) went into metrics.json and the run
            # ended FINISHED.
            if not math.isfinite(state.best_val_mae):
                raise TrainingDivergedError(
                    f"train.epochs=0: the initial network (train.pretrained={p.pretrained!r}: {weights_from}) "
                    f"predicts ages that are not numbers (validation MAE {state.best_val_mae}): its outputs "
                    "overflow; nothing is shipped")
        # The best epoch's own network (the initial one for train.epochs=0); finalize may ship a mix of it
        # with the pretrained network (WiSE-FT, the ensemble weight) and sets best_val_mae to the mix's.
        best_epoch_val_mae = state.best_val_mae
        extra = finalize(model, state, val_set, prepare, device, p, pretrained)
        model = full[0]  # (the frozen-prefix cache trained this network's later stages in place)
        meta = {
            "backbone": p.backbone, "min_age": MIN_AGE, "max_age": MAX_AGE, "image_size": int(input_shape[-1]),
            "mean": list(mean), "std": list(std), "crop": crop,
            "train_params": asdict(p), "best_epoch": state.best_epoch, "val_mae": state.best_val_mae,
            "best_epoch_val_mae": best_epoch_val_mae,
            "mlflow_run_id": state.run_id, "git_commit": state.git_commit, "data_sha256": crop["data_sha256"],
            "input": kind, **extra,
        }
        if state.resumed_at_commit:
            meta["resumed_at_commit"] = state.resumed_at_commit
        if head is not None:
            meta["head"] = head
        if pairs:  # the fused head
            meta["face_features"] = p.face_features
        if encoder_info is not None:
            meta["encoder"] = encoder_info
        save_checkpoint(model_path, model, meta)
        _write_history(reports_dir / "history.csv", state.history)
        metrics = {"best_val_mae": state.best_val_mae, "best_epoch": state.best_epoch,
                   "best_epoch_val_mae": best_epoch_val_mae, "epochs": p.epochs,
                   "train_time_s": round(state.history[-1]["elapsed_s"], 1) if state.history else 0.0}
        _write_text(reports_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        tracker.finish(metrics, extra, reports_dir, model_path, model, input_shape)
        write_run_file(run_path, state.run_id, tracker.experiment_id)
    # Last, after the run has ended: until here a rerun resumes, and redoes only idempotent steps.
    state_path.unlink(missing_ok=True)
    if mix := finetune.describe_mix(extra):
        log.info("best epoch %d: val MAE %.2f; shipped (%s): val MAE %.2f; checkpoint %s", state.best_epoch,
                 best_epoch_val_mae, mix, state.best_val_mae, model_path)
    else:
        log.info("best val MAE %.2f at epoch %d; checkpoint %s", state.best_val_mae, state.best_epoch, model_path)
    return {**metrics, "run_id": state.run_id}


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all ranks, on any device.

    torch's SyncBatchNorm runs on GPUs only; this one sums through torch's differentiable functional
    ``all_reduce`` (gloo or nccl; its backward sums the gradients), two passes as BatchNorm does
    (mean, then the centred squares). One rank, or eval mode, is plain BatchNorm2d.

    The statistics are taken in float32 and the output has the input's dtype, as cuDNN's BatchNorm does under
    ``train.amp``'s autocast: in the activations' fp16/bf16 the first step failed in ``running_mean.lerp_``
    ("expected dtype float for `end` but got dtype BFloat16"), and an fp16 per-channel sum over a batch of
    feature maps passes float16's 65504 (inf, then NaN outputs).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed._functional_collectives import all_reduce  # differentiable (sum of gradients)

        dtype, x = x.dtype, x.float()
        dims, shape, group = [0, 2, 3], (1, -1, 1, 1), dist.group.WORLD
        n = float(dist.get_world_size() * x.numel() // x.shape[1])  # equal local batches (drop_last)
        mean = all_reduce(x.sum(dims), "sum", group) / n
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims), "sum", group) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), m)
            self.running_var.lerp_(var.detach() * (n / max(n - 1, 1.0)), m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        return (y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y).to(dtype)


def _set_batchnorm_class(model: nn.Module, cls: type[nn.BatchNorm2d]) -> nn.Module:
    """Switches every BatchNorm2d layer between plain and global statistics (same parameters and buffers)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.__class__ = cls
    return model


def _plain(model: nn.Module) -> nn.Module:
    """A copy with plain BatchNorm2d layers, picklable without faceage (for MLflow)."""
    return _set_batchnorm_class(copy.deepcopy(model), nn.BatchNorm2d)


class _Tracker:
    """Rank 0's MLflow run: started or continued, each epoch logged once, ended last. Other ranks only
    get the state (loaded or new) and log nothing."""

    def __init__(self, p: TrainParams, d: Distributed, crop: dict, device: torch.device, workers: int,
                 threads: int, fingerprint: str, state: TrainState | None, state_path: Path):
        self.p, self.d, self.crop, self.device, self.workers, self.threads = p, d, crop, device, workers, threads
        self.fingerprint, self.state, self.state_path = fingerprint, state, state_path
        self.commit, self.logged, self.metrics = git_commit(), set(), set()

    @contextmanager
    def run(self) -> Iterator[TrainState]:
        """Yields the training state inside the MLflow run; an exception ends the run FAILED (KILLED on
        Ctrl-C) and keeps the saved state, so a rerun continues this same run."""
        if not self.d.is_main:
            yield self.state or TrainState(self.fingerprint, run_id="")
            return
        self.mlflow = setup_mlflow()
        try:
            run = self._start()
        except BaseException as e:  # a run started but not yet set up (params, tags, state) was left RUNNING
            if self.mlflow.active_run() is not None:
                self.mlflow.end_run(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self.experiment_id = run.info.experiment_id
        try:
            yield self.state
        except BaseException as e:
            self.mlflow.end_run(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self.mlflow.end_run()

    def _start(self):
        if self.state is not None:
            self.state.params = self.state.params or asdict(self.p)  # (a state saved before it kept them)
            lost = lost_run(self.state.run_id)
            if lost is None:
                run = self.mlflow.start_run(run_id=self.state.run_id)
                # Epochs saved but killed before (or while) their metrics were logged get logged now.
                client = self.mlflow.MlflowClient()
                self.logged = {m.step for m in client.get_metric_history(run.info.run_id, "val_mae")}
                data = client.get_run(run.info.run_id).data
                self.metrics = set(data.metrics)
                if not self.state.git_commit:  # a state saved before it kept its start commit
                    self.state.git_commit = data.tags.get("git_commit", self.commit)
                if not data.params:  # killed in _new_run before they were logged: the run and the state exist
                    self._describe_run()
                self._tag_this_process(data.tags)
                self.log_epochs()  # now, not with the next epoch: a rerun that fails before it left them out
                return run
            # A rerun that crashed on the lost run at every try could never finish: the training goes on in a
            # new run, which gets the params and tags again and every saved epoch's metrics (once).
            old = self.state.run_id
            log.warning("the MLflow run %s of the training state %s %s: continuing its %d saved epoch(s) in a new "
                        "run, with their metrics logged again", old, self.state_path, lost, self.state.epoch)
            self.state.git_commit = self.state.git_commit or self.commit
            run = self._new_run({"replaces_mlflow_run_id": old})  # (saved there: a kill from here on continues it)
            self.log_epochs()
            return run
        self._end_superseded_run()
        self.state = TrainState(self.fingerprint, run_id="", git_commit=self.commit, params=asdict(self.p))
        return self._new_run()

    def _new_run(self, tags: dict[str, str] | None = None):
        """Starts an MLflow run for ``self.state`` (its ``run_id`` set to it), saves the state, then gives the run
        its tags and params (:meth:`_describe_run`).

        Saved before them: a ``kill -9`` between ``start_run`` and a save after them (a slow server) left a RUNNING
        run that no state named, for ever, and the rerun started another. Now the rerun continues it and describes
        it (:meth:`_start`). ``tags`` go with the run's creation, as they are this process's alone.
        """
        run = self.mlflow.start_run(run_name=run_name(self.p), tags=tags)
        self.state.run_id = run.info.run_id
        save_state(self.state_path, self.state)  # a run killed from here on, before its first epoch ends, is continued
        self._describe_run()
        self._tag_this_process({})
        return run

    def _describe_run(self) -> None:
        """The run's tags, then its params in one batch (all of them stored or none: a run with params has both)."""
        p = self.p
        self.mlflow.set_tags({"git_commit": self.state.git_commit, "data_sha256": self.crop["data_sha256"],
                              "data_source": self.crop["data_source"], "backbone": p.backbone,
                              "device": self.device.type})
        self.mlflow.log_params({**{f"train.{k}": v for k, v in asdict(p).items()},
                                **{f"preprocess.{k}": v for k, v in self.crop.items()},
                                "train.loader_workers": self.workers, "train.torch_threads": self.threads,
                                "train.world_size": self.d.world_size,
                                # train.head=auto's choice, comparable across runs in `mlflow ui` (dlib_age only)
                                **({"train.head_resolved": head} if (head := finetune.resolve_head(p)) else {})})

    def _tag_this_process(self, tags: dict[str, str]) -> None:
        """Tags what this process (a start or a resume) changes about the run, given its current ``tags``.

        ``dvc_experiment``: the DVC experiment this process trains in (``dvc exp run`` sets ``DVC_EXP_NAME``:
        the name ``dvc exp show`` / ``apply`` know it by), removed when it runs outside one: a killed
        ``dvc exp run`` resumed under another name (or by ``dvc repro``) ends in that one, not in the killed.
        ``resumed_at_commit``: HEAD, when it is not the commit the run started at (``git_commit``).
        """
        if name := os.environ.get("DVC_EXP_NAME"):
            self.mlflow.set_tag(DVC_EXPERIMENT_TAG, name)
        elif DVC_EXPERIMENT_TAG in tags:
            self.mlflow.delete_tag(DVC_EXPERIMENT_TAG)
        if self.commit != self.state.git_commit:
            self.state.resumed_at_commit = self.commit
        if self.state.resumed_at_commit:
            self.mlflow.set_tag(RESUMED_AT_COMMIT_TAG, self.state.resumed_at_commit)

    def _end_superseded_run(self) -> None:
        """A state file left for other params or data (a run killed, then rerun after a params change), or one
        this code's network cannot load (:func:`_resume`), names a run nothing will continue: it stayed RUNNING in
        MLflow for ever. It is ended KILLED."""
        try:
            old = torch.load(self.state_path, map_location="cpu", weights_only=True).get("run_id")
        except Exception:  # no state, or not one this code can read: nothing to end
            return
        if not old:
            return
        from mlflow.exceptions import MlflowException

        client = self.mlflow.MlflowClient()
        try:
            if client.get_run(old).info.status == "RUNNING":
                client.set_terminated(old, "KILLED")
                log.info("ended MLflow run %s KILLED: its training state was for other params, data or code", old)
        except MlflowException:  # a run of another tracking store
            pass

    def log_gflops(self, gflops: float) -> None:
        if "model_gflops" not in self.metrics:
            self.mlflow.log_metric("model_gflops", gflops)

    def log_summary(self, summary: Path, n_params: int) -> None:
        self.mlflow.log_artifact(str(summary))
        self.mlflow.log_param("train.num_parameters", n_params)  # the same value again on resume: allowed

    def log_epochs(self) -> None:
        for row in self.state.history:
            if row["epoch"] not in self.logged:
                # One batch per epoch: either all its metrics are stored or none.
                self.mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=row["epoch"])
                self.logged.add(row["epoch"])

    def finish(self, metrics: dict, extra: dict, reports_dir: Path, model_path: Path, model: nn.Module,
               input_shape: tuple[int, ...]) -> None:
        self.log_epochs()
        self.log_final(metrics, extra)
        self.mlflow.log_artifact(str(reports_dir / "history.csv"))
        # The self-describing checkpoint travels with the run, so any winning run can be packaged.
        self.mlflow.log_artifact(str(model_path), artifact_path="checkpoint")
        if not self._has_logged_model():
            _log_model(self.mlflow, _plain(model), input_shape)

    def log_final(self, metrics: dict, extra: dict) -> None:
        """The run's closing metrics, once: a run killed after logging them (before its state file was
        deleted) and then rerun logged each a second time."""
        final = {**{k: metrics[k] for k in ("best_val_mae", "best_epoch", "best_epoch_val_mae") if k in metrics},
                 **{k: float(v) for k, v in extra.items() if isinstance(v, (int, float))}}
        self.mlflow.log_metrics({k: v for k, v in final.items() if k not in self.metrics})

    def _has_logged_model(self) -> bool:
        """A run killed after logging its model and then rerun must not log a second one."""
        # Filtered by the store, not here: a search returns one page (100 models), and an experiment
        # with more would hide this run's model, which would then be logged twice.
        models = self.mlflow.MlflowClient().search_logged_models(
            [self.experiment_id], filter_string=f"source_run_id = '{self.state.run_id}' AND name = 'model'")
        return any(str(m.status).endswith("READY") for m in models)


def _write_summary(reports_dir: Path, model: nn.Module, p: TrainParams, weights_from: str, tracker: _Tracker) -> None:
    """``model_summary.txt``, written by every run (DVC deletes it before rerunning a stage)."""
    n_params = sum(t.numel() for t in model.parameters())
    summary = reports_dir / "model_summary.txt"
    text = f"backbone: {p.backbone}\nparameters: {n_params}\nweights: {weights_from}\n\n{_plain(model)}\n"
    _write_text(summary, text)
    tracker.log_summary(summary, n_params)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def _write_history(path: Path, history: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, "w", encoding="utf-8", newline="") as f:  # newline="": the csv module's own line ends
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def _log_model(mlflow, model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Logs the network (normalised images or descriptors -> 101 logits) with a signature and example."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    cpu_model = copy.deepcopy(model).cpu().eval()
    # two rows: torch.export specialises a dimension whose example size is 1, and the exported
    # model would then accept only one image per call
    example = np.zeros((2, *input_shape), dtype=np.float32)
    with torch.no_grad():
        out = cpu_model(torch.from_numpy(example)).numpy()
    # Exported on CPU, so it loads anywhere. MLflow checks the input example by loading the model
    # through pyfunc, which picks CUDA when present and cannot move a pt2 model's weights there: on a
    # GPU box the check would fail (logged as a warning) unless told the device the weights are on.
    with mlflow_env("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cpu"):
        mlflow.pytorch.log_model(cpu_model, name="model", input_example=example,
                                 signature=infer_signature(example, out), pip_requirements=_requirements())


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"torch=={version('torch')}", f"torchvision=={version('torchvision')}"]
