"""Frozen torch modules run in ONNX Runtime on CPU, checked against torch before use.

Input: a module in eval mode whose weights will not change while it runs (the frozen networks
whose features ``train`` computes once, the graph ``evaluate`` scores) and a real example batch.
Output: a callable with the module's signature (tensors in, tensors out) that runs the exported
graph in ONNX Runtime with the process's torch thread count.

Why: on CPU, ONNX Runtime runs these convolution stacks 2-4x faster than eager torch
(``benchmarks/frozen_runtime.py``, 256 real chip pairs, 2 threads, side by side: the fused head's
frozen features 0.46x of torch's time, the whole age graph with both views 0.27x). Serving already
runs the exported graph, so training and evaluation on these outputs get closer to what is served,
not further.

The export is checked on the example: every output must stay within ``tolerance`` + ``RELATIVE``
times torch's value, else (or if the export fails) the torch module is used and the reason logged.
On CUDA the torch module is used as it is. Adaptive average pools the TorchScript exporter cannot
export (VGG's and AlexNet's at another image size than 224) are exported as their bins
(:func:`exportable_pools`), as :mod:`faceage.export` exports the served graph.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # allowed difference, ONNX Runtime vs torch, on the example batch: 1e-4 + 1e-5 * |torch's value|
RELATIVE = 1e-5
OPSET = 17


class OrtModule:
    """``module`` exported to ONNX and run by ONNX Runtime (CPU), with a dynamic batch axis.

    Args:
        module: The frozen module (eval mode; one tensor in, a tensor or a tuple of tensors out).
        example: A real input batch (2+ items) to trace and check on.
        threads: ONNX Runtime intra-op threads (default: torch's thread count).
        tolerance: Allowed absolute difference of every output on ``example`` (plus
            :data:`RELATIVE` times the value: ages in years differ more than probabilities).

    Raises:
        ValueError: The exported graph disagrees with torch on ``example`` by more than that.
    """

    def __init__(self, module: nn.Module, example: torch.Tensor, *, threads: int | None = None,
                 tolerance: float = TOLERANCE):
        from faceage.onnx_model import cpu_session

        module.eval()
        example = example.detach().cpu().contiguous()
        with torch.no_grad():
            expected = _as_tuple(module(example))
        names = [f"out{i}" for i in range(len(expected))]
        buffer = io.BytesIO()
        with warnings.catch_warnings(), exportable_pools(module, example):
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
            torch.onnx.export(module, (example,), buffer, input_names=["input"], output_names=names,
                              opset_version=OPSET, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}})
        self.session = cpu_session(buffer.getvalue(), threads or torch.get_num_threads())
        # The graph's input type: a float batch of another width is cast to it, as torch's own ops would
        # promote it. Fed as it came, float64 or float16 input was refused ("Unexpected input data type").
        self._float_input = {"tensor(float)": np.float32, "tensor(double)": np.float64,
                             "tensor(float16)": np.float16}.get(self.session.get_inputs()[0].type)
        got = self._run(example)
        # Compared in float64: the export keeps each output's type (a float64 or int64 output stays one),
        # and comparing it with torch's cast to float32 raised "Float did not match Double".
        got, expected = [g.double() for g in got], [e.double() for e in expected]
        self.max_abs_diff = max(float((g - e).abs().max()) for g, e in zip(got, expected))
        if not all(torch.allclose(g, e, rtol=RELATIVE, atol=tolerance) for g, e in zip(got, expected)):
            raise ValueError(f"the ONNX Runtime graph differs from torch by up to {self.max_abs_diff:.2e} "
                             f"(allowed: {tolerance:.0e} + {RELATIVE:.0e} x the value)")

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        array = x.detach().cpu().numpy()
        if self._float_input is not None and np.issubdtype(array.dtype, np.floating):
            array = array.astype(self._float_input, copy=False)
        feed = {"input": np.ascontiguousarray(array)}
        return tuple(torch.from_numpy(o) for o in self.session.run(None, feed))

    def __call__(self, x: torch.Tensor):
        out = self._run(x)
        return out[0] if len(out) == 1 else out


def _bins(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) averaging matrix of ``adaptive_avg_pool``'s bins: [floor(i n_in / n_out), ceil((i+1) n_in / n_out))."""
    matrix = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-(i + 1) * n_in // n_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class _PoolByMatrices(nn.Module):
    """An ``nn.AdaptiveAvgPool2d`` at one input size as two matrix products (the same bins)."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        super().__init__()
        self.register_buffer("rows", _bins(in_hw[0], out_hw[0]))
        self.register_buffer("cols", _bins(in_hw[1], out_hw[1]).T.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols


def _pool_out(pool: nn.AdaptiveAvgPool2d) -> tuple:
    return pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2


@contextmanager
def exportable_pools(graph: nn.Module, example: torch.Tensor) -> Iterator[int]:
    """Swaps, for an export, each adaptive average pool whose output size does not divide its input's.

    The TorchScript exporter has no ONNX form for those: VGG's 7x7 and AlexNet's 6x6 pools export at
    224 px, but at train.image_size 64, 112, 128 or 256 the export fails ("Unsupported: ONNX export of
    operator adaptive_avg_pool2d, output size that are not factor of input size") and prints the whole
    traced graph to stdout. The pools that divide are left as they are, so those graphs are unchanged;
    a graph with no pool but global ones (output 1x1) is not run. Yields the number of pools swapped;
    puts them back on exit.
    """
    sizes: dict[str, tuple[int, int]] = {}
    pools = {name: m for name, m in graph.named_modules()
             if isinstance(m, nn.AdaptiveAvgPool2d) and any(o not in (1, None) for o in _pool_out(m))}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:  # None: the output stands
            sizes[name] = tuple(args[0].shape[-2:])
        return hook

    if pools:
        hooks = [m.register_forward_hook(record(name)) for name, m in pools.items()]
        try:
            with torch.no_grad():
                graph(example)
        finally:
            for hook in hooks:
                hook.remove()
    swapped = []
    for name, pool in pools.items():
        if name not in sizes:
            continue
        in_hw = sizes[name]
        out_hw = tuple(i if o is None else int(o) for i, o in zip(in_hw, _pool_out(pool)))
        if all(i % o == 0 for i, o in zip(in_hw, out_hw)):
            continue
        parent, attr = (graph.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]) if "." in name else (graph, name)
        setattr(parent, attr, _PoolByMatrices(in_hw, out_hw))
        swapped.append((parent, attr, pool))
    try:
        yield len(swapped)
    finally:
        for parent, attr, pool in swapped:
            setattr(parent, attr, pool)


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def cpu_runner(module: nn.Module, example: torch.Tensor, device: torch.device | str, what: str) -> Callable:
    """The fastest checked way to run the frozen ``module``: :class:`OrtModule` on CPU, else torch.

    Args:
        module: The frozen module (eval mode).
        example: A real input batch (2+ items) on ``device``.
        device: Where torch would run it.
        what: What runs, for the log.

    Returns:
        A callable on input batches (on ``device``), returning outputs on ``device``, without grad.
    """
    module.eval()

    def in_torch(x: torch.Tensor):
        with torch.no_grad():
            return module(x)

    if torch.device(device).type != "cpu":
        return in_torch
    try:
        runner = OrtModule(module, example)
    except Exception as e:  # noqa: BLE001 - any export or runtime failure: torch is the reference
        log.warning("running %s in torch: the ONNX Runtime export was not usable (%s)", what, e)
        return in_torch
    log.info("running %s in ONNX Runtime (%d threads; largest difference from torch on %d real inputs: %.1e)",
             what, runner.session.get_session_options().intra_op_num_threads, len(example), runner.max_abs_diff)
    return runner
