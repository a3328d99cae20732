"""The model card: what the model is, what it was trained on, how well it does, where it fails.

Input: the evaluation metrics (the same dict ``evaluate`` writes to ``metrics.json``, so the
card and ``dvc metrics show`` cannot disagree), the checkpoint's metadata, the dataset info
and the preprocess counts. Output: a Markdown file (UTF-8, replaced whole: :func:`faceage.atomic.write_text`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faceage.atomic import write_text
from faceage.config import DESCRIPTOR
from faceage.external import some_faces
from faceage.faces import crop_cnn_retry_side, crop_retry_pad
from faceage.tracking import portable_source, portable_uri


def _no_face_policy(no_face: str | None) -> str:
    """What the external sets' cropping did with an image without a detected face, for the card."""
    return {
        "release_crop": "`release_crop`: the set's `NAME_face.jpg` where it ships one; a set without release "
                        "crops has nothing to fall back on, so those images are skipped and counted",
        "whole_image": "`whole_image`: those images are scored on the whole photo, padded square",
        "skip": "`skip`: those images are skipped and counted",
    }.get(no_face, f"`{no_face}`")


def _validation_note(meta: dict[str, Any]) -> str:
    """The best epoch's validation MAE, and the shipped network's when training mixed it with the
    pretrained one (WiSE-FT, the ensemble weight)."""
    own = meta.get("best_epoch_val_mae", meta["val_mae"])
    if abs(own - meta["val_mae"]) < 5e-4:
        return f" ({_fmt(meta['val_mae'])} years)"
    from faceage.finetune import describe_mix

    return (f" ({_fmt(own)} years); shipped mixed with the pretrained network "
            f"({describe_mix(meta) or 'mixed'}): {_fmt(meta['val_mae'])} years")


def _backbone_note(meta: dict[str, Any], tp: dict[str, Any]) -> str:
    """What the backbone is and which part of it was trained."""
    if meta["backbone"] == "dlib_face":
        return (" (dlib's face-recognition ResNet, frozen, on faces aligned with its 5-point shape predictor; "
                "an MLP head over the 128-D descriptor)")
    start = tp.get("pretrained", "?")
    if meta["backbone"] == "dlib_age" and start != "none":  # any other value loads dlib's network (config.py)
        start = "dlib's age network (age-v1.onnx)"
        if meta.get("head") == "fused":
            start += " and face-recognition network (dlib_face_recognition_resnet_model_v1.dat)"
    else:
        start = f"`{start}`"
    note = f", input {meta['image_size']} px, weights at start: {start}"
    if meta.get("head") == "ensemble":
        note += ("; dlib's age network frozen, an ensemble of MLP heads over its features and its age "
                 "distribution, averaged over the face and its mirror image (`train.head=ensemble`)")
    elif meta.get("head") == "fused":
        face = ("the 128-D face descriptor" if meta.get("face_features", DESCRIPTOR) == DESCRIPTOR else
                "the face network's pooled block outputs (`train.face_features=layers`)")
        note += ("; dlib's age and face-recognition networks frozen, an ensemble of MLP heads over the age "
                 f"network's features and age distribution and {face}, averaged over the face "
                 "and its mirror image (`train.head=fused`)")
    elif meta.get("head") == "pretrained":
        note += "; dlib's own age head (`train.head=pretrained`)"
    return note


def _scored(m: dict[str, Any], key: str, digits: int = 2) -> str:
    """A set's metric ``key`` for the card's tables: ``-`` where the set has none, or had no face to score
    (evaluate reports such a set with NaN metrics, which read "nan" as if the model had output NaN)."""
    if key not in m or (key != "n_faces" and "n_faces" in m and not some_faces(m["n_faces"])):
        return "-"
    return str(m[key]) if digits == 0 else _fmt(m[key], digits)


def _external_table(external: dict[str, dict], cs_key: str) -> list[str]:
    """One row per cross-dataset set: its images, the faces scored, and the images skipped, faceless
    apart from unreadable (both were counted as "no face")."""
    return [
        f"| set | images | faces scored | skipped: no face | skipped: unreadable | MAE (years) | RMSE | "
        f"CS@{cs_key[2:]} | training-mean baseline MAE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| `{name}` | {m['n_images']} | {m['n_faces']} | {m.get('no_face', 0)} | {m.get('unreadable', 0)} | "
          f"{_scored(m, 'mae_years')} | {_scored(m, 'rmse_years')} | {_scored(m, cs_key, 3)} | "
          f"{_scored(m, 'baseline_mae_years')} |" for name, m in external.items()),
    ]


def _detector_limits(crop: dict) -> str:
    """The "Known limits" line for the checkpoint's detector (``crop.detector``: HOG, or dlib's CNN)."""
    if crop.get("detector") == "cnn":
        missed = ("- dlib's CNN detector finds turned and partly hidden faces too, but misses faces under ~80 px "
                  f"(~{80 // 2 ** int(crop.get('upsample', 0))} px at upsample {crop.get('upsample', 0)})")
    else:
        missed = "- The HOG detector finds frontal faces; profiles, strong occlusion and faces under ~40 px are missed"
        if crop_cnn_retry_side(crop):
            missed += (" (a photo where it finds none gets the CNN detector's look, which finds more turned and "
                       "close-up faces, but not small ones in a large photo)")
    return missed + ", and a missed face gets no age at all."


def _retry_note(crop: dict) -> str:
    """The detector's second look (``crop.retry_pad``); empty where the checkpoint's crops were made without it."""
    pad, side = crop_retry_pad(crop), crop_cnn_retry_side(crop)
    note = (f"; where it finds nothing, it looks again with a border of {pad:g} of the longer side, for faces that "
            "fill the frame" if pad else "")
    if side:
        note += (f"; where HOG finds nothing, dlib's CNN detector looks at the image scaled down to {side} px on its "
                 "longer side")
    return note


def _chip_note(meta: dict[str, Any]) -> str:
    """How a chip-input model sees each face (``faceage.chips``); empty for other inputs."""
    from faceage.inputs import DLIB_AGE_CHIP, DLIB_CHIP_PAIR, input_kind

    kind = input_kind(meta).name
    if kind == DLIB_AGE_CHIP:
        return (", read as the 5-point-aligned 64 px chip cut from that square before it is resized "
                "(the photo's own pixels, as dlib's network was trained)")
    if kind == DLIB_CHIP_PAIR:
        return (", read as the 5-point-aligned 64 px chip (age network) and 150 px chip (face-recognition "
                "network) cut from that square before it is resized (the photo's own pixels, as dlib's "
                "networks were trained)")
    return ""


def _augmentation(meta: dict[str, Any], tp: dict[str, Any]) -> str:
    """``train.augment``, and ``train.low_res`` where it applied (image inputs with augmentation on)."""
    note = f"augmentation {tp.get('augment', '?')}"
    if tp.get("augment") and meta["backbone"] != "dlib_face":  # dlib_face's descriptors are never degraded
        note += f" (share of faces at a lower resolution: {tp.get('low_res', 0)})"
    return note


def _training_line(meta: dict[str, Any], tp: dict[str, Any]) -> str:
    """How the network was trained; ``train.epochs=0`` (zero-shot) trained nothing, and its card said
    "0 epochs, ... augmentation True ...; best epoch 0 by validation MAE"."""
    if tp.get("epochs") == 0:
        return ("- Training: none (`train.epochs=0`): the pretrained network as it is, scored on the validation split"
                + _validation_note(meta) + ".")
    return (f"- Training: {tp.get('epochs', '?')} epochs, loss `{tp.get('loss', '?')}`, optimiser "
            f"`{tp.get('optimizer', '?')}` lr {tp.get('lr', '?')}, batch {tp.get('batch_size', '?')}, "
            f"{_augmentation(meta, tp)}; best epoch {meta.get('best_epoch', '?')} by validation MAE"
            + _validation_note(meta) + ".")


def _trained_on(tp: dict[str, Any], dataset: dict[str, Any], preprocess_counts: dict[str, Any] | None) -> str:
    """The "Known limits" opening: what the model learnt from (nothing here at ``train.epochs=0``): the training
    split's crops where preprocess skipped some of its images (``preprocess.no_face=skip``, unreadable files), whose
    card gave the release's image count instead."""
    if tp.get("epochs") == 0:
        return "Not trained on this data (`train.epochs=0`): the pretrained network as it is."
    images = dataset.get("counts", {}).get("train", "?")
    split = (preprocess_counts or {}).get("train")
    if isinstance(split, dict) and isinstance(images, int):
        faces = sum(int(split.get(status, 0)) for status in ("face", "release_crop", "whole_image"))
        if faces != images:
            return (f"Trained on {faces} faces of the {images} training images ({images - faces} skipped: no face "
                    "or unreadable).")
    return f"Trained on {images} images."


def _resumed_note(meta: dict[str, Any]) -> str:
    """``, resumed and finished at `<commit>``` for a run stopped and resumed at another commit (its checkpoint's
    ``resumed_at_commit``: its last epochs trained with that commit's code), else empty."""
    return f", resumed and finished at `{meta['resumed_at_commit']}`" if meta.get("resumed_at_commit") else ""


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def _signed(x: float) -> str:
    """A mean error with its sign, ``+1.25`` / ``-0.40``; one that rounds to zero is ``+0.00``, not ``-0.00``."""
    return f"{round(x, 2) + 0.0:+.2f}"  # + 0.0 turns round()'s -0.0 into 0.0


def _cell(text: Any) -> str:
    """``text`` as one Markdown table cell. Group labels come verbatim from the data set's CSVs (gender, race): a
    ``|`` in one split its row into one cell more than the header, and a quoted line break ended the table."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _group_table(title: str, groups: list[dict[str, Any]]) -> list[str]:
    lines = [f"| {title} | faces | MAE (years) | mean error (years; + = predicted too old) |", "|---|---:|---:|---:|"]
    lines += [f"| {_cell(g['group'])} | {g['n']} | {_fmt(g['mae_years'])} | {_signed(g['bias_years'])} |"
              for g in groups]
    return lines


def _largest_bias(where: str, groups: list[dict[str, Any]]) -> str:
    """``where``'s age group with the largest mean signed error, in words."""
    g = max(groups, key=lambda g: abs(g["bias_years"]))
    if round(g["bias_years"], 2) == 0:
        return f"on {where}, no age group is predicted too young or too old on average (within 0.005 years)"
    side = "old" if g["bias_years"] >= 0 else "young"
    return f"on {where}, faces of {g['group']} are predicted {_fmt(abs(g['bias_years']))} years too {side} ({g['n']} faces)"


def _metrics_table(metrics: dict[str, Any], cs_key: str) -> list[str]:
    """The test split's headline numbers, each cross-dataset set's in a column beside them: the error on
    another collection's faces is what a user's own photos are closer to."""
    external = metrics.get("external") or {}
    columns = [("test split", {**metrics, "n_faces": metrics["n_test_faces"]}),
               *((f"`{name}`", m) for name, m in external.items())]
    rows = [("MAE, apparent age (years)", "mae_years", 2), ("MAE, real age (years)", "mae_real_years", 2),
            ("RMSE (years)", "rmse_years", 2), (f"CS@{cs_key[2:]}", cs_key, 3),
            ("Baseline MAE: always the training mean", "baseline_mae_years", 2), ("Faces evaluated", "n_faces", 0)]
    lines = []
    if external:
        lines += ["The test split comes from the collection the model was trained on; each cross-dataset set "
                  "(`evaluate.external`, below) from another one, closer to what your own photos will give. "
                  "A set's MAE is against its `apparent_age_avg` labels (real ages for UTKFace).", ""]
    lines += ["| metric | " + " | ".join(title for title, _ in columns) + " |",
              "|---|" + "---:|" * len(columns)]
    for label, key, digits in rows:
        cells = [_scored(m, key, digits) for _, m in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _calibration(metrics: dict[str, Any], external: dict[str, dict]) -> list[str]:
    """The temperature, the test split's coverage of the predicted std, and each cross-dataset set's beside it (how
    honest the std is on another collection's faces); ``-`` for a set with no face scored, or evaluated before its
    calibration was measured."""
    lines = [
        f"- Temperature {_fmt(metrics['temperature'], 3)} (fitted on the validation split so that age +- k std "
        "covers the true age as often as a Gaussian would, k = 0.25..3).",
        f"- On the test split: true age within 1 std: {_fmt(metrics['coverage_1std'], 3)} (a Gaussian would give "
        f"0.683); within 2 std: {_fmt(metrics['coverage_2std'], 3)} (0.954); mean predicted std "
        f"{_fmt(metrics['mean_predicted_std'])} years.",
    ]
    if not external:
        return lines
    columns = [("test split", metrics), *((f"`{name}`", m) for name, m in external.items())]
    rows = [("true age within 1 std (a Gaussian: 0.683)", "coverage_1std", 3),
            ("true age within 2 std (a Gaussian: 0.954)", "coverage_2std", 3),
            ("mean predicted std (years)", "mean_predicted_std", 2)]
    lines += ["", "Side by side with each cross-dataset set (`evaluate.external`):", "",
              "| | " + " | ".join(title for title, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(_scored(m, key, digits) for _, m in columns) + " |"
              for label, key, digits in rows]
    return lines


def write_model_card(path: str | Path, metrics: dict[str, Any], groups: dict[str, list[dict[str, Any]]],
                     meta: dict[str, Any], dataset: dict[str, Any], preprocess_counts: dict[str, Any] | None,
                     tracking_uri: str | None, external_groups: dict[str, list[dict[str, Any]]] | None = None) -> Path:
    """Writes ``path`` (Markdown) from evaluation results and checkpoint metadata.

    Args:
        path: Output file.
        metrics: ``evaluate``'s metrics (``mae_years``, ``coverage_1std``, ...).
        groups: ``{"age_group": [...], "gender": [...], "race": [...]}``, each a list of
            ``{"group", "n", "mae_years", "bias_years"}`` rows (see :func:`faceage.evaluation.errors_by`).
        meta: The checkpoint metadata (:func:`faceage.model.load_checkpoint`).
        dataset: ``dataset.json`` of the fetched data (source, counts, sha256).
        preprocess_counts: Detection counts per split (``reports/preprocess.json``), if available.
        tracking_uri: Where the MLflow run lives, shown without this machine's folders
            (:func:`faceage.tracking.portable_uri`): a sqlite store under the repo root as ``sqlite:///mlflow.db``,
            one elsewhere by its file name.
        external_groups: Age-group rows of each cross-dataset set (``metrics["external"]`` holds its numbers).

    Returns:
        The written path.
    """
    tp = meta.get("train_params", {})
    crop = meta["crop"]
    worst = max(groups["age_group"], key=lambda g: g["mae_years"])
    smallest = min(groups["age_group"], key=lambda g: g["n"])
    cs_key = next(k for k in metrics if k.startswith("cs") and k[2:].replace(".", "").isdigit())
    lines = [
        f"# Model card: FaceAge {meta['backbone']}",
        "",
        "## Model",
        f"- Estimates the **apparent age** (years, {meta['min_age']}..{meta['max_age']}) of each face: a softmax over "
        f"{meta['max_age'] - meta['min_age'] + 1} ages, prediction = its expectation, `age_std` = the standard "
        "deviation of the distribution at a temperature calibrated on the validation split.",
        f"- Backbone: `{meta['backbone']}`" + _backbone_note(meta, tp) + ".",
        _training_line(meta, tp),
        f"- Faces: dlib `{crop['detector']}` detector (upsample {crop['upsample']}" + _retry_note(crop) + "), square crop with margin "
        f"{crop['margin']}, {crop['size']} px" + _chip_note(meta) + "; the service uses the same detector file "
        f"(sha256 `{crop['detector_sha256'][:16]}...`) and crop code.",
        "",
        "## Data",
        # A password or a presigned URL's signature in fetch_data.source stays out of the card (which the bento
        # serves at GET /model_card), and so do this machine's folders of a local source.
        f"- Source: `{portable_source(dataset.get('source'))}`; sha256 of all files: `{dataset.get('sha256', '?')}`.",
        "- Images per split: " + ", ".join(f"{k} {v}" for k, v in dataset.get("counts", {}).items()) + ".",
    ]
    if preprocess_counts:
        total = preprocess_counts["total"]
        lines.append(
            f"- Face found by the detector in {total['face']} images ({_fmt(100 * preprocess_counts['detection_rate'], 1)}%); "
            f"fallback crops: {total['release_crop']} release crops, {total['whole_image']} whole images; "
            f"skipped: {total['no_face']} without a face, {total['unreadable']} unreadable.")
    lines += [
        "",
        "## Test metrics",
        *_metrics_table(metrics, cs_key),
        "",
        "### By age group (true apparent age)",
        *_group_table("age group", groups["age_group"]),
    ]
    for attribute in ("gender", "race"):
        if groups.get(attribute):
            lines += ["", f"### By {attribute}", *_group_table(attribute, groups[attribute])]
    external = metrics.get("external") or {}
    if external:
        lines += [
            "",
            "## Cross-dataset test sets",
            "Labelled faces from collections the model never trained or was tuned on (`evaluate.external`), "
            "cropped with the same detector and crop settings; an image without a detected face follows the "
            f"same `no_face` policy as training ({_no_face_policy(crop.get('no_face'))}).",
            "",
            *_external_table(external, cs_key),
        ]
        for name in external:
            if external_groups and external_groups.get(name):
                lines += ["", f"### `{name}` by age group (true age)", *_group_table("age group", external_groups[name])]
    scored = [("test split", metrics), *((f"`{name}`", m) for name, m in external.items())]
    fractions = sorted({f for _, m in scored for f in m.get("mae_low_res") or {}}, key=float, reverse=True)
    if fractions:
        lines += [
            "",
            "## Smaller faces",
            "MAE (years) with each input scaled down to a fraction of its side and back up "
            "(`evaluate.low_res`): the same faces, as if photographed smaller, as in group photos.",
            "",
            "| set | full resolution | " + " | ".join(f"{f} of the side" for f in fractions) + " |",
            "|---|---:|" + "---:|" * len(fractions),
        ]
        lines += [f"| {name} | {_fmt(m['mae_years'])} | "
                  + " | ".join(_fmt(m["mae_low_res"][f]) if f in m["mae_low_res"] else "-" for f in fractions) + " |"
                  for name, m in scored if m.get("mae_low_res")]
    lines += [
        "",
        "## Calibration",
        *_calibration(metrics, external),
        "",
        "## Known limits",
        f"- {_trained_on(tp, dataset, preprocess_counts)} The largest test error is in age group "
        f"{worst['group']} ({_fmt(worst['mae_years'])} years on {worst['n']} faces); the smallest group, "
        f"{smallest['group']}, has {smallest['n']} test faces, so its number is the least certain.",
        "- The largest systematic error by age (mean predicted - true): " + "; ".join(
            [_largest_bias("the test split", groups["age_group"])]
            + [_largest_bias(f"`{name}`", rows) for name, rows in (external_groups or {}).items() if rows])
        + ". Photos made mostly of such faces inherit it.",
        _detector_limits(crop),
        "- Apparent age is what raters perceive; it can differ from real age by several years either way.",
        "- Demographic breakdowns are reported where the data carries labels; small groups give noisy numbers.",
        "",
        "## Lineage",
        f"- git commit `{meta.get('git_commit', 'unknown')}`" + _resumed_note(meta),
        f"- MLflow run `{meta.get('mlflow_run_id', '?')}`" + (f" in `{portable_uri(tracking_uri)}`" if tracking_uri
                                                               else ""),
        f"- data sha256 `{meta.get('data_sha256', '?')}`",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # UTF-8 whatever the locale (packaging and GET /model_card read it so; group labels and the source may not be
    # ASCII), and whole or not at all: Path.write_text truncated the previous card before an encoding error or a
    # full disk stopped it, and left an empty card behind.
    write_text(path, "\n".join(lines) + "\n")
    return path


def card_run_id(text: str) -> str | None:
    """The MLflow run a card written by :func:`write_model_card` describes (its Lineage line), or None (no such
    line, or a run the checkpoint did not record: ``?``)."""
    import re

    found = re.search(r"^- MLflow run `([^`]*)`", text, re.MULTILINE)
    return found.group(1) if found and found.group(1) not in ("", "?") else None
