"""Training: expected-age classification over ages 0..100, resumable, tracked in MLflow.

Input: the ``preprocess`` output folder and :class:`TrainParams`. Outputs:

- the best checkpoint by validation MAE (self-describing, see :mod:`faceage.model`);
- ``history.csv`` (one row per epoch) and ``metrics.json`` (best validation MAE);
- a ``run.json`` naming the MLflow run, which ``evaluate`` and packaging continue.

A resumable state (model, optimiser, schedule, RNG, history, MLflow run id) is written after
every epoch. If training is interrupted and rerun with the same params and data, it resumes
from the last finished epoch; the state is deleted once training completes.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from faceage.config import ConfigError, TrainParams
from faceage.data import load_split
from faceage.download import file_digest
from faceage import finetune
from faceage.chips import DLIB_AGE
from faceage.face_encoder import FACE_ENCODER
from faceage.inference import input_fn, predict_logits
from faceage.model import (
    MAX_AGE, MIN_AGE, build_model, expected_age, fit_temperature,
    input_stats, load_pretrained, save_checkpoint,
)
from faceage.preprocess import MANIFEST, read_crop_settings
from faceage.tracking import git_commit, setup_mlflow, tracking_uri, write_run_file
from faceage.transforms import train_augment

log = logging.getLogger(__name__)


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


def pin_threads() -> int:
    """One torch thread per core in this process; data-loader workers get one each (no oversubscription)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)
    return cores


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def age_loss(logits: torch.Tensor, target: torch.Tensor, kind: str, sigma: float) -> torch.Tensor:
    """Loss on 101-way logits for target ages (years).

    ``expectation_l1``: |E[age] - target| (the tutorial's loss).
    ``label_distribution``: KL(N(target, sigma) || softmax) + |E[age] - target| (DLDL-v2).
    """
    mean, _ = expected_age(logits)
    l1 = (mean - target).abs().mean()
    if kind == "expectation_l1":
        return l1
    ages = torch.arange(MIN_AGE, MIN_AGE + logits.shape[1], device=logits.device, dtype=torch.float32)
    q = torch.exp(-((ages[None, :] - target[:, None]) ** 2) / (2 * sigma**2))
    q = q / q.sum(dim=1, keepdim=True)
    log_p = torch.log_softmax(logits.float(), dim=1)
    kl = (q * (torch.log(q.clamp_min(1e-12)) - log_p)).sum(dim=1).mean()
    return kl + l1


def lr_factor(step: int, steps_per_epoch: int, p: TrainParams) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine / step decay / constant."""
    warmup = p.warmup_epochs * steps_per_epoch
    total = p.epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if p.scheduler == "cosine":
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if p.scheduler == "step":
        epoch = step // steps_per_epoch
        return 0.1 ** sum(epoch >= m for m in (int(p.epochs * 0.5), int(p.epochs * 0.75)))
    return 1.0


def _fingerprint(p: TrainParams, faces_dir: Path, embeddings_path: str | Path | None) -> str:
    h = hashlib.sha256(json.dumps(asdict(p), sort_keys=True).encode())
    h.update(file_digest(faces_dir / MANIFEST).encode())
    if p.backbone in (FACE_ENCODER, DLIB_AGE) and embeddings_path is not None:
        h.update(file_digest(embeddings_path).encode())
    h.update(json.dumps(read_crop_settings(faces_dir), sort_keys=True).encode())
    return h.hexdigest()


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
    cores = os.cpu_count() or 1
    # On a small CPU box, worker processes only steal cores from the forward/backward pass.
    return 0 if device.type == "cpu" and cores <= 4 else min(8, max(cores - 1, 1))


def train_model(p: TrainParams, faces_dir: str | Path, model_path: str | Path, reports_dir: str | Path,
                run_path: str | Path, state_path: str | Path, embeddings_path: str | Path | None = None,
                detector_dir: str | Path | None = None) -> dict:
    """Trains, validates each epoch, keeps the best checkpoint, logs everything to MLflow.

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
        ``{"best_val_mae": ..., "best_epoch": ..., "epochs": ..., "run_id": ...}``.

    Raises:
        faceage.model.PretrainedWeightsError: ``train.pretrained`` weights are unreachable.
    """
    faces_dir, reports_dir, state_path = Path(faces_dir), Path(reports_dir), Path(state_path)
    reports_dir.mkdir(parents=True, exist_ok=True)
    cores = pin_threads()
    device = select_device(p.device)
    torch.manual_seed(p.seed)
    crop = read_crop_settings(faces_dir)

    finetune.check_params(p)
    model = build_model(p.backbone)
    weights_from = load_pretrained(model, p.backbone, p.pretrained, model_dir=detector_dir)
    model.to(device)
    pretrained_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_set = load_split(faces_dir, "train", p.backbone, p.image_size, embeddings_path,
                           transform=train_augment(augment=p.augment), augment=p.augment)
    val_set = load_split(faces_dir, "valid", p.backbone, p.image_size, embeddings_path)
    mean, std = input_stats(p.backbone)
    prepare = input_fn(p.backbone, mean, std)
    input_shape = tuple(val_set.images.shape[1:])
    cache = finetune.prefix_cache(model, train_set, val_set, prepare, p, device)
    if cache is not None:  # frozen early stages computed once; the loop trains the rest
        model, train_set, val_set, prepare = cache.training_view()
    distill = finetune.Distillation(model, p.distill_weight)
    workers = _loader_workers(p, device)
    loader = DataLoader(train_set, batch_size=p.batch_size, shuffle=True, drop_last=len(train_set) > p.batch_size,
                        num_workers=workers, worker_init_fn=_worker_init, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(p.seed))
    steps_per_epoch = len(loader)
    if p.optimizer == "adamw":
        opt = torch.optim.AdamW(finetune.param_groups(model, p), lr=p.lr, weight_decay=p.weight_decay)
    else:
        opt = torch.optim.SGD(finetune.param_groups(model, p), lr=p.lr, momentum=0.9, nesterov=True, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps_per_epoch, p))
    use_amp = p.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    fingerprint = _fingerprint(p, faces_dir, embeddings_path)
    start_epoch, history, best, run_id = 1, [], {"val_mae": float("inf"), "epoch": 0, "state": None}, None
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            start_epoch, history, run_id = state["epoch"] + 1, state["history"], state["run_id"]
            best = {"val_mae": state["best_val_mae"], "epoch": state["best_epoch"], "state": state["best_model"]}
            log.info("resuming from epoch %d of %d (%s)", state["epoch"], p.epochs, state_path)
        else:
            log.info("ignoring %s: it was written for other params or data", state_path)

    mlflow = setup_mlflow()
    tags = {"git_commit": git_commit(), "data_sha256": crop["data_sha256"], "data_source": crop["data_source"],
            "backbone": p.backbone, "device": device.type}
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else f"{p.backbone}-{p.image_size}px-{p.epochs}ep")
    try:
        if run_id is None:
            mlflow.log_params({**{f"train.{k}": v for k, v in asdict(p).items()},
                               **{f"preprocess.{k}": v for k, v in crop.items()},
                               "train.loader_workers": workers, "train.torch_threads": cores})
            mlflow.set_tags(tags)
            summary = reports_dir / "model_summary.txt"
            n_params = sum(t.numel() for t in model.parameters())
            summary.write_text(f"backbone: {p.backbone}\nparameters: {n_params}\nweights: {weights_from}\n\n{model}\n")
            mlflow.log_artifact(str(summary))
            mlflow.log_param("train.num_parameters", n_params)
            mlflow.log_metric("model_gflops", count_gflops(model, tuple(val_set.images.shape[1:]), device))
        log.info("training %s (weights: %s) on %s: %d train / %d valid faces, %d epochs, batch %d, "
                 "%d loader workers, %d torch threads; MLflow run %s in %s",
                 p.backbone, weights_from, device, len(train_set), len(val_set), p.epochs, p.batch_size,
                 workers, cores, run.info.run_id, tracking_uri())
        t_start = time.time()
        for epoch in range(start_epoch, p.epochs + 1):
            model.train()
            t0, seen, loss_sum, mae_sum = time.time(), 0, 0.0, 0.0
            for images, ages, age_stds in loader:
                images, ages, age_stds = images.to(device), ages.to(device), age_stds.to(device)
                target = ages
                if p.label_jitter:
                    target = (ages + age_stds * torch.randn_like(ages)).clamp(MIN_AGE, MAX_AGE)
                x = prepare(images)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    logits = model(x)
                loss = age_loss(logits, target, p.loss, p.label_sigma) + distill(logits, x)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                n = len(ages)
                seen += n
                loss_sum += loss.item() * n  # a CPU-GPU sync point, once per step
                mae_sum += (expected_age(logits.detach())[0] - ages).abs().sum().item()
            train_s = time.time() - t0
            val_pred, _ = expected_age(predict_logits(model, val_set.images, prepare, device))
            val_mae = (val_pred - val_set.ages).abs().mean().item()
            row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_mae": mae_sum / seen, "val_mae": val_mae,
                   "lr": opt.param_groups[0]["lr"], "images_per_s": seen / train_s, "elapsed_s": time.time() - t_start}
            history.append(row)
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=epoch)
            log.info("epoch %d/%d  loss %.4f  train MAE %.2f  val MAE %.2f  lr %.2e  %.0f img/s  %.0f s",
                     epoch, p.epochs, row["train_loss"], row["train_mae"], val_mae, row["lr"], row["images_per_s"],
                     row["elapsed_s"])
            if val_mae < best["val_mae"]:
                best = {"val_mae": val_mae, "epoch": epoch,
                        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            _write_history(reports_dir / "history.csv", history)
            torch.save({"fingerprint": fingerprint, "epoch": epoch, "history": history, "run_id": run.info.run_id,
                        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "rng": torch.get_rng_state(), "best_val_mae": best["val_mae"], "best_epoch": best["epoch"],
                        "best_model": best["state"]}, state_path.with_suffix(".tmp"))
            os.replace(state_path.with_suffix(".tmp"), state_path)

        if p.epochs == 0:  # the pretrained model as it is: scored and tracked like a trained one
            best = _zero_shot(model, val_set, prepare, device, history, reports_dir, mlflow)
        model.load_state_dict(best["state"])
        if p.wise_ft and p.epochs > 0:
            alpha, wise_mae, _ = finetune.interpolate_weights(
                model, pretrained_state,
                lambda: (expected_age(predict_logits(model, val_set.images, prepare, device))[0] - val_set.ages).abs())
            best["val_mae"] = wise_mae
            mlflow.log_metrics({"wise_alpha": alpha, "wise_val_mae": wise_mae})
        # Calibrate the predicted spread on the validation split (the mean is unaffected).
        temperature = fit_temperature(predict_logits(model, val_set.images, prepare, device), val_set.ages)
        if cache is not None:
            model, train_set, val_set, prepare = cache.full_view()
        meta = {
            "backbone": p.backbone, "min_age": MIN_AGE, "max_age": MAX_AGE,
            "image_size": int(input_shape[-1]), "mean": list(mean), "std": list(std), "crop": crop,
            "train_params": asdict(p), "best_epoch": best["epoch"], "val_mae": best["val_mae"],
            "mlflow_run_id": run.info.run_id, "git_commit": tags["git_commit"], "data_sha256": crop["data_sha256"],
            "temperature": temperature,
            "input": {FACE_ENCODER: "dlib_face_embedding", DLIB_AGE: "dlib_age_chip"}.get(p.backbone, "image"),
        }
        if p.backbone in (FACE_ENCODER, DLIB_AGE):
            meta["encoder"] = train_set.info
        save_checkpoint(model_path, model, meta)
        metrics = {"best_val_mae": best["val_mae"], "best_epoch": best["epoch"], "epochs": p.epochs,
                   "train_time_s": round(history[-1]["elapsed_s"], 1)}
        (reports_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        mlflow.log_metrics({"best_val_mae": best["val_mae"], "best_epoch": best["epoch"], "temperature": temperature})
        mlflow.log_artifact(str(reports_dir / "history.csv"))
        # The self-describing checkpoint travels with the run, so any winning run can be packaged.
        mlflow.log_artifact(str(model_path), artifact_path="checkpoint")
        _log_model(mlflow, model, input_shape)
        write_run_file(run_path, run.info.run_id, run.info.experiment_id)
    except BaseException as e:
        # The resumable state keeps the run id: a rerun continues this same MLflow run.
        mlflow.end_run(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run()
    state_path.unlink(missing_ok=True)
    log.info("best val MAE %.2f at epoch %d; checkpoint %s", best["val_mae"], best["epoch"], model_path)
    return {**metrics, "run_id": run.info.run_id}


def _zero_shot(model: nn.Module, val_set, prepare, device: torch.device, history: list[dict], reports_dir: Path,
               mlflow) -> dict:
    """``train.epochs=0``: one history row (epoch 0) with the untrained model's validation MAE."""
    val_mae = (expected_age(predict_logits(model, val_set.images, prepare, device))[0] - val_set.ages).abs().mean().item()
    history.append({"epoch": 0, "train_loss": float("nan"), "train_mae": float("nan"), "val_mae": val_mae,
                    "lr": 0.0, "images_per_s": float("nan"), "elapsed_s": 0.0})
    mlflow.log_metrics({"val_mae": val_mae}, step=0)
    _write_history(reports_dir / "history.csv", history)
    log.info("train.epochs=0: the pretrained model as it is, val MAE %.2f", val_mae)
    return {"val_mae": val_mae, "epoch": 0, "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}


def _write_history(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _log_model(mlflow, model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Logs the network (normalised images or descriptors -> 101 logits) with a signature and example."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    cpu_model = copy.deepcopy(model).cpu().eval()
    example = np.zeros((1, *input_shape), dtype=np.float32)
    with torch.no_grad():
        out = cpu_model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(cpu_model, name="model", input_example=example,
                             signature=infer_signature(example, out), pip_requirements=_requirements())


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"torch=={version('torch')}", f"torchvision=={version('torchvision')}"]
