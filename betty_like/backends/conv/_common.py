"""What every conv algorithm of this package shares: layout and autocast probes, the per-input key,
padding, output size and the final cast.

Shared conventions (:func:`operands` and :func:`finish`): padding of every mode is applied to the
input first, so the algorithms only compute "valid" cross-correlations; half types (fp16, bf16) are
computed in float32 and rounded once at the end; under autocast the output takes the autocast dtype,
as torch's own convolution does; the output is channels-last when the input or weight is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_channels_last(t: Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last (and not also plainly contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` right now, or None when autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def input_key(x: Tensor) -> tuple[tuple[Any, ...], str]:
    """What a conv choice depends on (shape, dtype, device, layout, autocast, grad mode) and how to show it."""
    channels_last = is_channels_last(x)
    key = (tuple(x.shape), x.dtype, x.device, channels_last, torch.is_grad_enabled(), autocast_dtype(x.device.type))
    shown = f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')} {x.device}{' channels_last' if channels_last else ''}"
    return key, shown


_HALF = (torch.float16, torch.bfloat16)


def _pads(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """The layer's padding in ``F.pad`` order (left, right, top, bottom), ``"same"`` and ``"valid"`` included."""
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":
        pads: list[int] = []
        for d, k in zip(reversed(layer.dilation), reversed(layer.kernel_size), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = layer.padding
    return (pw, pw, ph, ph)


def operands(
    layer: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, torch.dtype]:
    """Padded input, weight and bias in the compute dtype, and the dtype the output must have."""
    out_dtype = autocast_dtype(x.device.type)
    if out_dtype is None:
        if x.dtype != weight.dtype:
            raise TypeError(
                f"conv2d: input is {x.dtype} but the weight is {weight.dtype}; cast the input or the layer to one dtype"
            )
        out_dtype = x.dtype
    compute = torch.float32 if out_dtype in _HALF else out_dtype
    x, weight = x.to(compute), weight.to(compute)
    bias = bias.to(compute) if bias is not None else None
    pads = _pads(layer)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    return x, weight, bias, out_dtype


def out_size(layer: nn.Conv2d, xp: Tensor) -> tuple[int, int]:
    sizes = []
    for size, k, s, d in zip(xp.shape[2:], layer.kernel_size, layer.stride, layer.dilation, strict=True):
        extent = d * (k - 1) + 1
        if size < extent:
            raise ValueError(
                f"conv2d: padded input of spatial size {tuple(xp.shape[2:])} is smaller than the dilated kernel "
                f"({layer.extra_repr()}); give a larger input or more padding"
            )
        sizes.append((size - extent) // s + 1)
    return sizes[0], sizes[1]


def finish(y: Tensor, bias: Tensor | None, x: Tensor, weight: Tensor, out_dtype: torch.dtype) -> Tensor:
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    y = y.to(out_dtype)
    if is_channels_last(x) or is_channels_last(weight):
        y = y.contiguous(memory_format=torch.channels_last)
    return y
