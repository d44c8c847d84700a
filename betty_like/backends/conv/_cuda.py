"""cuDNN's own algorithm choices, reached through torch's cuDNN flags (CUDA only).

PyTorch exposes no way to pin one cuDNN convolution algorithm (implicit GEMM, precomputed implicit
GEMM, FFT, Winograd, ...) from Python: that needs a C++ extension calling cuDNN directly. What torch
does expose are the flags that steer cuDNN's own choice, so these algorithms are torch's convolution
run under one setting each:

- ``cudnn_benchmark``: cuDNN times its algorithms for each new shape and keeps the fastest
  (``torch.backends.cudnn.benchmark = True``);
- ``cudnn_deterministic``: only deterministic cuDNN algorithms;
- ``cuda_native``: cuDNN disabled, PyTorch's native CUDA kernels.

The flags are set around the forward call only; the backward kernels run later, under whatever
flags are global then.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._algorithms import torch_conv

Impl = Callable[[nn.Conv2d, Tensor, Tensor, Tensor | None], Tensor]


def supports(layer: nn.Conv2d) -> str | None:
    if layer.weight.device.type != "cuda":
        return "cuDNN choices need the layer on a CUDA device"
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available in this torch build"
    return None


def _under_flags(enabled: bool, benchmark: bool, deterministic: bool) -> Impl:
    def impl(layer: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        with torch.backends.cudnn.flags(
            enabled=enabled,
            benchmark=benchmark,
            deterministic=deterministic,
            allow_tf32=torch.backends.cudnn.allow_tf32,
        ):
            return torch_conv(layer, x, weight, bias)

    return impl


ALGORITHMS: dict[str, Impl] = {
    "cudnn_benchmark": _under_flags(enabled=True, benchmark=True, deterministic=False),
    "cudnn_deterministic": _under_flags(enabled=True, benchmark=False, deterministic=True),
    "cuda_native": _under_flags(enabled=False, benchmark=False, deterministic=False),
}
