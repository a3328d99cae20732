"""Names of evaluate.external sets beyond ASCII folder names."""

import pytest

from faceage.sources import NAME_MAX, ExternalSetError, external_name


def test_accented_letters_keep_their_latin_letter():
    """``visages-été`` was ``visages_t`` and ``café`` ``caf`` in metrics.json, MLflow and the card."""
    assert external_name("/data/visages-été") == "visages_ete" and external_name("café/") == "cafe"
    assert external_name("../shared/datasets/utk-external") == "utk_external"  # ASCII names are unchanged


def test_sets_named_in_other_scripts_are_told_apart_not_refused():
    """``photos-日本`` and ``photos-中国`` were both ``photos`` (refused as two sets sharing a name), and
    ``лица`` could not be named at all."""
    japan, china, faces = external_name("/d/photos-日本"), external_name("/d/photos-中国"), external_name("/d/лица")
    assert japan.startswith("photos_") and china.startswith("photos_") and japan != china
    assert faces.startswith("set_") and faces == external_name("/other/лица")  # the same folder name, the same set name
    for name in (japan, china, faces):
        assert name.isascii() and name.replace("_", "").isalnum()
    with pytest.raises(ExternalSetError, match="cannot name a set"):
        external_name("/")


def test_a_long_folder_name_gives_a_metric_key_mlflow_takes():
    long = "faces-" + "x" * 300
    name = external_name(f"/d/{long}")
    assert len(name) <= NAME_MAX and len(f"external_{name}_mae_low_res_0.25") <= 250
    assert name != external_name(f"/d/{long}y")  # truncated names stay apart
