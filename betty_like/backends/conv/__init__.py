"""ai3-style per-layer convolution algorithms for ``nn.Conv2d``, all differentiable twice.

Registered algorithms (see docs/backends/conv.md for tolerances and measured speed):

- ``torch``: PyTorch's own convolution, the passthrough;
- ``direct``: one multiply-accumulate per kernel tap, the reference (not timed by ``auto``);
- ``im2col``: ``F.unfold`` + one matmul per group;
- ``winograd``: F(2x2, 3x3), offered only for 3x3 kernels with stride 1 and dilation 1;
- ``fft``: ``torch.fft.rfft2`` spectra multiplied and summed over channels;
- on CUDA: ``cudnn_benchmark``, ``cudnn_deterministic``, ``cuda_native`` (cuDNN's own choices);
- with the optional ``aithree`` package installed: ``ai3_direct``, ``ai3_smm``.

Use :func:`swap` (:func:`betty_like.backends.registry.swap` with ``op="conv2d"``) with a policy: one
name, a list by layer order, a callable ``f(layer, input_shape)`` or ``"auto"``. This ``__init__`` is
the package's whole public API; the modules inside are private.
"""

from __future__ import annotations

from torch import nn

from .. import registry
from ..registry import Policy, Tuner, available, choice_table, choices, define_op, register
from . import _ai3, _cuda
from ._algorithms import direct, fft, im2col, torch_conv, winograd, winograd_supports
from ._auto import ConvTuner, default_cache_path, default_tuner
from ._common import input_key
from ._layer import AlgorithmConv2d, wrap

__all__ = [
    "AlgorithmConv2d",
    "ConvTuner",
    "available",
    "choice_table",
    "choices",
    "default_cache_path",
    "swap",
]



def swap(module: nn.Module, policy: Policy, *, tuner: Tuner | None = None, prefix: str = "") -> nn.Module:
    """Replace every ``nn.Conv2d`` of ``module`` in place by one running the algorithm ``policy`` picks.

    :func:`betty_like.backends.registry.swap` for ``op="conv2d"``: parameters keep their identity and
    names; ``tuner`` overrides the default :class:`ConvTuner` for ``"auto"``. Returns ``module``.
    """
    return registry.swap(module, policy, op="conv2d", tuner=tuner, prefix=prefix)


define_op("conv2d", nn.Conv2d, AlgorithmConv2d, wrap, default_tuner, input_key=input_key)
register("conv2d", "torch", torch_conv)
register("conv2d", "direct", direct, tunable=False)
register("conv2d", "im2col", im2col)
register("conv2d", "winograd", winograd, supports=winograd_supports)
register("conv2d", "fft", fft)
for _name, _impl in _cuda.ALGORITHMS.items():
    register("conv2d", _name, _impl, supports=_cuda.supports)
_ai3 = _ai3.load()
if _ai3 is not None:
    for _name in _ai3.ALGORITHMS:
        register("conv2d", f"ai3_{_name}", _ai3.make(_ai3, _name), supports=_ai3.supports)
