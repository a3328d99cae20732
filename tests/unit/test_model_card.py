"""The model card's headline table: the test split with each cross-dataset set beside it."""

from faceage.model_card import _metrics_table

TEST = {"mae_years": 4.6009, "mae_real_years": 4.61, "rmse_years": 6.7, "cs5": 0.66, "baseline_mae_years": 21.74,
        "n_test_faces": 300}
EXTERNAL = {"mae_years": 7.0385, "rmse_years": 9.53, "cs5": 0.4771, "baseline_mae_years": 25.58, "n_faces": 1726}


def rows(lines: list[str]) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for line in lines if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_each_external_set_has_a_column_beside_the_test_split():
    table = rows(_metrics_table({**TEST, "external": {"utk_external": EXTERNAL, "other": EXTERNAL}}, "cs5"))
    assert table["metric"] == ["test split", "`utk_external`", "`other`"]
    assert table["MAE, apparent age (years)"] == ["4.60", "7.04", "7.04"]
    assert table["CS@5"] == ["0.660", "0.477", "0.477"]
    assert table["Faces evaluated"] == ["300", "1726", "1726"]
    assert table["MAE, real age (years)"] == ["4.61", "-", "-"]  # the sets have one label column


def test_without_external_sets_the_test_split_stands_alone():
    lines = _metrics_table({**TEST, "external": {}}, "cs5")
    assert lines[0] == "| metric | test split |" and rows(lines)["Faces evaluated"] == ["300"]


def test_known_limits_name_the_checkpoints_own_detector():
    """A preprocess.detector=cnn model's card described the HOG detector, with a stray " ," where
    there was no CNN look."""
    from faceage.model_card import _detector_limits

    hog = _detector_limits({"detector": "hog", "upsample": 1, "cnn_retry_side": 0})
    assert hog.startswith("- The HOG detector finds frontal faces") and " ," not in hog
    looked = _detector_limits({"detector": "hog", "upsample": 1, "cnn_retry_side": 400, "retry_pad": 0.35})
    assert "gets the CNN detector's look" in looked and " ," not in looked
    cnn = _detector_limits({"detector": "cnn", "upsample": 1})
    assert "HOG" not in cnn and "CNN detector" in cnn and "~40 px at upsample 1" in cnn


def test_the_external_table_counts_unreadable_images_apart_from_faceless_ones():
    """The "skipped (no face)" column was images - faces: an unreadable image counted as faceless."""
    from faceage.model_card import _external_table

    table = rows(_external_table({"utk": {**EXTERNAL, "n_images": 1743, "n_faces": 1740, "no_face": 1,
                                          "unreadable": 2}}, "cs5"))
    assert table["set"][:4] == ["images", "faces scored", "skipped: no face", "skipped: unreadable"]
    assert table["`utk`"][:4] == ["1743", "1740", "1", "2"]


def test_the_cards_no_face_note_describes_the_checkpoints_own_policy():
    """Every card said faceless external images "are skipped and counted", also under whole_image,
    where they are scored on the whole photo."""
    from faceage.model_card import _no_face_policy

    assert "skipped" not in _no_face_policy("whole_image") and "whole photo" in _no_face_policy("whole_image")
    assert "skipped and counted" in _no_face_policy("skip") and "NAME_face.jpg" not in _no_face_policy("skip")
    assert "NAME_face.jpg" in _no_face_policy("release_crop") and "skipped" in _no_face_policy("release_crop")


def test_the_card_tells_the_best_epochs_mae_from_the_shipped_mixs():
    """After an ensemble-weight or WiSE-FT mix the card credited the best epoch with the mix's MAE."""
    from faceage.model_card import _validation_note

    assert _validation_note({"val_mae": 4.494, "best_epoch_val_mae": 4.494}) == " (4.49 years)"
    assert _validation_note({"val_mae": 4.494}) == " (4.49 years)"  # a checkpoint from before the key
    mixed = _validation_note({"val_mae": 5.481, "best_epoch_val_mae": 24.74, "ensemble_weight": 0.0})
    assert mixed == " (24.74 years); shipped mixed with the pretrained network (ensemble weight 0.00): 5.48 years"


def test_a_mean_error_that_rounds_to_zero_is_not_printed_as_a_negative_zero():
    from faceage.model_card import _group_table, _largest_bias

    groups = [{"group": "0-9", "n": 3, "mae_years": 1.0, "bias_years": -0.004},
              {"group": "10-19", "n": 4, "mae_years": 2.0, "bias_years": 0.001}]
    table = "\n".join(_group_table("age", groups))
    assert "-0.00" not in table and table.count("| +0.00 |") == 2
    assert _largest_bias("the test split", groups) == (
        "on the test split, no age group is predicted too young or too old on average (within 0.005 years)")
    groups[1]["bias_years"] = -1.236
    assert "| -1.24 |" in "\n".join(_group_table("age", groups))
    assert _largest_bias("the test split", groups) == "on the test split, faces of 10-19 are predicted 1.24 years too young (4 faces)"
