"""Round 31: a ViT weights file saved by torchvision 0.12 (the release whose weights torchvision still serves),
whose MLP blocks name their layers ``mlp.linear_1`` / ``mlp.linear_2`` where later releases name them ``mlp.0`` /
``mlp.3``, loads as ``train.pretrained``, as torchvision's own ``load_state_dict`` takes it.

A real (randomly initialised) vit_b_32 and a real file in ``tmp_path``, its keys renamed as torchvision 0.12
wrote them.
"""

import re

import torch

from faceage.model import build_model, head_prefix, load_pretrained


def _as_torchvision_0_12(state: dict) -> dict:
    """torchvision 0.12's names: MLPBlock was an nn.Sequential of linear_1, act, dropout_1, linear_2, dropout_2."""
    def old(key: str) -> str:
        return re.sub(r"\.mlp\.([03])\.", lambda m: f".mlp.linear_{int(m.group(1)) // 3 + 1}.", key)

    return {old(k): v for k, v in state.items()}


def test_a_vit_weights_file_from_torchvision_0_12_loads_every_layer_but_the_head(tmp_path):
    """It was refused: "does not fit backbone 'vit_b_32' (e.g. ['encoder.layers.encoder_layer_0.mlp.0.weight', ...])";
    torchvision's ImageNet ViT files are such files, so train.pretrained=imagenet failed for every ViT too."""
    torch.manual_seed(1)
    donor = build_model("vit_b_32", num_ages=10)
    state = _as_torchvision_0_12(donor.state_dict())
    assert "encoder.layers.encoder_layer_0.mlp.linear_1.weight" in state
    assert not any(".mlp.0." in k for k in state)
    path = tmp_path / "vit_b_32-torchvision-0.12.pth"
    torch.save(state, path)

    torch.manual_seed(2)
    model = build_model("vit_b_32")
    assert load_pretrained(model, "vit_b_32", str(path)) == str(path)
    head = head_prefix(model)
    own, want = model.state_dict(), donor.state_dict()
    for key, value in want.items():
        if not key.startswith(head):
            assert torch.equal(own[key], value), key
    assert own["encoder.layers.encoder_layer_11.mlp.3.weight"].shape == (768, 3072)
