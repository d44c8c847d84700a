"""ai3's CPU convolutions (the optional ``aithree`` package) as extra candidates, with its faults guarded.

ai3 0.1.0 reads raw memory, so a channels-last or transposed input gives silently wrong output; it
refuses groups != 1, half types and non-zero padding modes, and runs on CPU only. Here its forward
always gets a contiguous float32/float64 input that is already padded (any padding mode), only
ungrouped CPU layers are offered, and the backward is ours: torch's differentiable
``convolution_backward``, so second derivatives work too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._common import finish, operands, out_size

ALGORITHMS = ("direct", "smm")


def load() -> Any | None:
    """ai3's raw conv2d function, or None when the ``aithree`` package is not installed.

    The unrelated PyPI package ``ai3`` also imports as ``ai3``; only a module with
    ``swap_torch.conv2d`` counts.
    """
    try:
        module = importlib.import_module("ai3.swap_torch")
    except ImportError:
        return None
    return getattr(module, "conv2d", None)


def supports(layer: nn.Conv2d) -> str | None:
    if layer.groups != 1:
        return "ai3 supports groups=1 only"
    if layer.weight.device.type != "cpu":
        return "ai3's wheel runs on CPU only"
    return None


class _Ai3Conv(torch.autograd.Function):
    """Forward by ai3 on a padded contiguous input; backward by torch (differentiable, so twice)."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None, stride: tuple, dilation: tuple, run: Callable) -> Tensor:
        return run(x.contiguous(), w.contiguous(), None if b is None else b.contiguous(), stride, dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, w, b, stride, dilation, _ = inputs
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.dilation, ctx.has_bias = stride, dilation, b is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        x, w = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, w, [w.shape[0]] if ctx.has_bias else None,
            list(ctx.stride), [0, 0], list(ctx.dilation), False, [0, 0], 1, mask,
        )
        return gx, gw, gb, None, None, None


def make(raw: Callable, name: str) -> Callable[[nn.Conv2d, Tensor, Tensor, Tensor | None], Tensor]:
    """The registry implementation of ai3 algorithm ``name``."""

    def run(x: Tensor, w: Tensor, b: Tensor | None, stride: tuple, dilation: tuple) -> Tensor:
        out = raw(x, w, b, 0, 0, stride[0], stride[1], dilation[0], dilation[1], 0, 1, name)
        return out.clone()  # ai3 returns a view of its own buffer

    def impl(layer: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        xp, w, b, out_dtype = operands(layer, x, weight, bias)
        out_size(layer, xp)
        y = _Ai3Conv.apply(xp, w, b, tuple(layer.stride), tuple(layer.dilation), run)
        return finish(y, None, x, weight, out_dtype)

    return impl
