"""The MLflow run's name says what the backbone reads: a CNN its crop size, dlib's networks not train.image_size."""

from dataclasses import replace

from faceage.config import TrainParams
from faceage.training import run_name


def test_a_cnn_run_is_named_by_its_crop_size():
    assert run_name(TrainParams(backbone="resnet18", image_size=112, epochs=5)) == "resnet18-112px-5ep"


def test_dlib_age_runs_are_named_by_their_head_not_the_crop_size():
    p = TrainParams(backbone="dlib_age", image_size=224, epochs=30)
    assert run_name(p) == "dlib_age-fused-30ep"  # head auto: the fused head
    assert run_name(replace(p, epochs=0)) == "dlib_age-pretrained-0ep"  # the zero-shot network
    assert run_name(replace(p, head="ensemble")) == "dlib_age-ensemble-30ep"
    assert "224px" not in run_name(p)


def test_a_dlib_face_run_is_named_by_its_descriptors():
    assert run_name(TrainParams(backbone="dlib_face", image_size=224, epochs=40)) == "dlib_face-descriptors-40ep"
