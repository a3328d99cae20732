"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) as a ``torch.nn.Module``.

Input: the ``.dat`` file of the ``fetch_detector`` folder (dlib's own serialisation of its
``anet_type``) and 150 px face chips in ``dlib.get_face_chip`` geometry (padding 0.25, see
:mod:`faceage.chips`), normalised like dlib's ``input_rgb_image``: ``(RGB - mean) / 256`` with
the same channel means as the age network. Output: the 128-D descriptor dlib's
``compute_face_descriptor`` returns for that chip (parity-tested against dlib to 1e-5), or
(:meth:`DlibFaceNet.pooled_layers`) the mean-pooled outputs of three of its residual blocks.

Why a port: dlib-bin computes one descriptor in ~80 ms on one CPU core; the same network in torch
takes ~14 ms and, exported to ONNX with the age model, ~6 ms in ONNX Runtime. That makes a head
over both of dlib's networks (``train.head=fused``, :mod:`faceage.dlib_age`) cheaper to serve than
the ``dlib_face`` service, and it needs no dlib at inference beyond the shape predictor.

The graph (dlib's ``dnn_face_recognition_ex.cpp``): a 7x7/2 convolution without padding, an
affine layer (frozen batch norm), ReLU and a 3x3/2 max pool; then 14 residual blocks of
conv-affine-relu-conv-affine (3 at 32 channels, 4 at 64, 3 at 128, 4 at 256), each down-sampling
block with a 3x3/2 unpadded convolution and a 2x2 average-pooled shortcut, summed over unequal
shapes by zero-padding the trailing channels, rows and columns (dlib's ``add_prev``); global
average pooling and a 256 -> 128 linear layer without bias.

Which features a fused age head reads (``train.face_features``): the descriptor (default) is trained
to tell people apart, so its linear layer keeps 128 of the 256 pooled directions and discards what
varies within a person, age among it. ``layers``, the pooled outputs of the 128-channel stage's last
block, the 256-channel stage's last block before the final down-sampling and the final block (what
the descriptor's linear layer reads), :data:`POOLED_BLOCKS`, carry more: a head over them has 0.3
years lower out-of-fold MAE on the training split and test MAE, but trained without one gender it
trails the pretrained network on that gender by up to 1.1 years where the descriptor's head stays
within 0.11 years of it (``reports/recipe_dlib_age.md``, rounds 15-16). They cost nothing more to serve: the network runs
to its last block either way.

The file format: dlib writes each layer after the layers below it, as a name string followed by
its parameters: ``con_4`` (one tensor: filters (out, in, kh, kw) then biases; then the filter
count, kernel size, strides and paddings), ``affine_`` (one tensor: the scales then the offsets)
and ``fc_2`` (the output and input sizes, then one (in, out) weight tensor). Integers are dlib's
packed form (a byte giving the length, the 0x80 bit for a negative sign, then little-endian
bytes); tensors are a version (2), four packed sizes and little-endian float32 values.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceage.config import DESCRIPTOR, FACE_FEATURES, LAYERS
from faceage.dlib_age import REFETCH, Affine, NetworkFileError, ResidualBlock

DESCRIPTOR_DIM = 128
FEATURE_DIM = 256
# (in channels, out channels, down-sampling) of the 14 residual blocks, input side first
BLOCKS = ([(32, 32, False)] * 3 + [(32, 64, True)] + [(64, 64, False)] * 3 + [(64, 128, True)] +
          [(128, 128, False)] * 2 + [(128, 256, True)] + [(256, 256, False)] * 2 + [(256, 256, True)])
# (0-based) blocks whose mean-pooled outputs are the ``layers`` features: 128 + 256 + 256 values
POOLED_BLOCKS = (9, 12, 13)
LAYERS_DIM = sum(BLOCKS[b][1] for b in POOLED_BLOCKS)
_LAYER = re.compile(rb"\x01(?:\x05con_4|\x07affine_|\x04fc_2)")


class DlibFaceNet(nn.Module):
    """Normalised (N, 3, 150, 150) face chips -> (N, 128) descriptors (dlib's, see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, 32, 7, stride=2)
        self.stem_affine = Affine(32)
        self.blocks = nn.Sequential(*(ResidualBlock(i, o, down) for i, o, down in BLOCKS))
        self.fc = nn.Linear(FEATURE_DIM, DESCRIPTOR_DIM, bias=False)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.stem_affine(self.stem_conv(x))), 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))

    def pooled_layers(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (N, 3, 150, 150) face chips -> (N, :data:`LAYERS_DIM`): the mean-pooled outputs
        of the blocks :data:`POOLED_BLOCKS`, in that order."""
        x = self.stem(x)
        pooled = []
        for i, block in enumerate(self.blocks[:POOLED_BLOCKS[-1] + 1]):
            x = block(x)
            if i in POOLED_BLOCKS:
                pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)

    def features(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """The ``kind`` (:data:`FACE_FEATURES`) features of normalised face chips."""
        if kind == DESCRIPTOR:
            return self(x)
        if kind == LAYERS:
            return self.pooled_layers(x)
        raise ValueError(f"face features must be one of {', '.join(map(repr, FACE_FEATURES))}, got {kind!r}")


def _packed_int(buf: bytes, i: int) -> tuple[int, int]:
    n = buf[i]
    value = int.from_bytes(buf[i + 1:i + 1 + (n & 0x7F)], "little")
    return (-value if n & 0x80 else value), i + 1 + (n & 0x7F)


def _tensor(buf: bytes, i: int) -> tuple[np.ndarray, int]:
    version, i = _packed_int(buf, i)
    if version != 2:
        raise ValueError(f"unsupported dlib tensor version {version} at byte {i}")
    size = 1
    for _ in range(4):
        dim, i = _packed_int(buf, i)
        size *= dim
    return np.frombuffer(buf, "<f4", size, i).copy(), i + 4 * size


def read_dlib_layers(path: str | Path) -> list[tuple[str, np.ndarray, list[int]]]:
    """The parameter layers of a dlib network file, input side first: ``(name, values, ints)``.

    Raises:
        faceage.dlib_age.NetworkFileError: The file ends inside a layer, or holds a tensor of another version (the
            message names it); a ``ValueError``.
    """
    buf = Path(path).read_bytes()
    try:
        return _read_layers(buf)
    except (ValueError, IndexError) as e:  # numpy's "buffer is smaller than requested size" named no file
        raise NetworkFileError(f"{path} is not a whole dlib network file ({e}): {REFETCH}") from e


def _read_layers(buf: bytes) -> list[tuple[str, np.ndarray, list[int]]]:
    layers = []
    for m in _LAYER.finditer(buf):
        name = m.group()[2:].decode()
        i = m.end()
        ints = []
        if name == "fc_2":
            for _ in range(2):
                v, i = _packed_int(buf, i)
                ints.append(v)
        values, i = _tensor(buf, i)
        if name == "con_4":
            for _ in range(7):
                v, i = _packed_int(buf, i)
                ints.append(v)
        layers.append((name, values, ints))
    return layers


def face_net_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The :class:`DlibFaceNet` ``state_dict`` read from dlib's ``.dat`` file.

    Raises:
        faceage.dlib_age.NetworkFileError: The file does not hold this network (layer count or a shape differs);
            a ``ValueError``.
    """
    layers = read_dlib_layers(path)
    net = DlibFaceNet()
    convs = ["stem_conv"] + [f"blocks.{b}.conv{k}" for b in range(len(BLOCKS)) for k in (1, 2)]
    affines = ["stem_affine"] + [f"blocks.{b}.affine{k}" for b in range(len(BLOCKS)) for k in (1, 2)]
    found = {n: [lay for lay in layers if lay[0] == n] for n in ("con_4", "affine_", "fc_2")}
    if (len(found["con_4"]), len(found["affine_"]), len(found["fc_2"])) != (len(convs), len(affines), 1):
        raise NetworkFileError(f"{path} is not dlib's face-recognition ResNet: {len(found['con_4'])} convolutions, "
                               f"{len(found['affine_'])} affine and {len(found['fc_2'])} fc layers, expected "
                               f"{len(convs)}, {len(affines)} and 1: {REFETCH}")
    ref = net.state_dict()
    state = {}
    for name, (_, values, ints) in zip(convs, found["con_4"]):
        shape = ref[f"{name}.weight"].shape
        n = shape.numel()
        if values.size != n + shape[0] or ints[:3] != [shape[0], shape[2], shape[3]]:
            raise NetworkFileError(f"{path}: layer {name} holds {values.size} values {ints}, expected "
                                   f"{tuple(shape)} + bias: {REFETCH}")
        state[f"{name}.weight"] = torch.from_numpy(values[:n].reshape(tuple(shape)))
        state[f"{name}.bias"] = torch.from_numpy(values[n:])
    for name, (_, values, _) in zip(affines, found["affine_"]):
        k = ref[f"{name}.scale"].numel()
        if values.size != 2 * k:
            raise NetworkFileError(f"{path}: layer {name} holds {values.size} values, expected {2 * k}: {REFETCH}")
        state[f"{name}.scale"] = torch.from_numpy(values[:k]).view(1, k, 1, 1)
        state[f"{name}.offset"] = torch.from_numpy(values[k:]).view(1, k, 1, 1)
    _, values, (outputs, inputs) = found["fc_2"][0]
    if (outputs, inputs, values.size) != (DESCRIPTOR_DIM, FEATURE_DIM, DESCRIPTOR_DIM * FEATURE_DIM):
        raise NetworkFileError(f"{path}: fc layer {inputs} -> {outputs}, expected {FEATURE_DIM} -> {DESCRIPTOR_DIM}: "
                               f"{REFETCH}")
    state["fc.weight"] = torch.from_numpy(values.reshape(FEATURE_DIM, DESCRIPTOR_DIM).T.copy())  # dlib: x @ W
    return state


def load_face_net(path: str | Path) -> DlibFaceNet:
    """dlib's face-recognition network from its ``.dat`` file, in eval mode."""
    net = DlibFaceNet()
    net.load_state_dict(face_net_state_dict(path))
    return net.eval()
