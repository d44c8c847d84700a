"""The convolution algorithms, written in plain differentiable torch ops.

Every function has the registry's signature ``(layer, x, weight, bias) -> y`` for a 4-D input and
reads stride, padding, dilation, groups and padding mode from ``layer`` (an ``nn.Conv2d``). Because
they are compositions of ordinary torch ops, autograd gives each one its backward and its double
backward, which hypergradients through the model need.

Padding, dtypes and layout follow the conventions of :mod:`._common`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import finish, operands, out_size


# ---------------------------------------------------------------------------------------- algorithms
def torch_conv(layer: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """PyTorch's own convolution (oneDNN on CPU, cuDNN on CUDA): the passthrough and the reference."""
    return layer._conv_forward(x, weight, bias)  # noqa: SLF001 - torch's own conv, with explicit weights


def direct(layer: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Direct convolution: one multiply-accumulate of a strided input slice per kernel tap.

    Vectorised over batch, channels and output pixels, looping only over the kh*kw taps; the
    plainest formula, kept as a reference for tests rather than for speed.
    """
    xp, w, b, out_dtype = operands(layer, x, weight, bias)
    ho, wo = out_size(layer, xp)
    n, c = xp.shape[:2]
    o, g = w.shape[0], layer.groups
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    xg = xp.reshape(n, g, c // g, *xp.shape[2:])
    wg = w.reshape(g, o // g, c // g, kh, kw)
    y = None
    for i in range(kh):
        for j in range(kw):
            tap = xg[..., i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            term = torch.einsum("ngchw,goc->ngohw", tap, wg[..., i, j])
            y = term if y is None else y + term
    return finish(y.reshape(n, o, ho, wo), b, x, weight, out_dtype)


def im2col(layer: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """im2col + GEMM: unfold the patches into a (C*kh*kw) x (Ho*Wo) matrix, one matmul per group.

    Costs kh*kw times the input's memory for the unfolded matrix; its backward is ``fold``.
    """
    xp, w, b, out_dtype = operands(layer, x, weight, bias)
    ho, wo = out_size(layer, xp)
    n, c = xp.shape[:2]
    o, g = w.shape[0], layer.groups
    cols = F.unfold(xp, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
    cols = cols.reshape(n, g, cols.shape[1] // g, cols.shape[2])
    y = torch.matmul(w.reshape(g, o // g, -1), cols)
    return finish(y.reshape(n, o, ho, wo), b, x, weight, out_dtype)


# Bᵀ, G, Aᵀ of Lavin & Gray's F(2x2, 3x3) for cross-correlation (entries exact in every float dtype).
# Plain constants converted per call, not an ``lru_cache`` keyed by dtype and device: Dynamo traces
# through such a cache (and warns that it ignores it), and converting three 4x4 tensors is cheap.
_WINOGRAD = tuple(
    torch.tensor(m, dtype=torch.float64)
    for m in (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    )
)


def winograd_supports(layer: nn.Conv2d) -> str | None:
    if layer.kernel_size != (3, 3) or layer.stride != (1, 1) or layer.dilation != (1, 1):
        return "Winograd F(2x2,3x3) needs a 3x3 kernel, stride 1 and dilation 1"
    return None


def winograd(layer: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Winograd F(2x2, 3x3): each 2x2 output tile from a 4x4 input tile with 16 multiplies instead of 36.

    Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A per tile, the elementwise products summed over input channels as
    16 batched matmuls. The transforms add rounding error (a few times direct's in float32).
    """
    xp, w, b, out_dtype = operands(layer, x, weight, bias)
    ho, wo = out_size(layer, xp)
    n, c = xp.shape[:2]
    o, g = w.shape[0], layer.groups
    th, tw = math.ceil(ho / 2), math.ceil(wo / 2)
    xp = F.pad(xp, (0, 2 * tw + 2 - xp.shape[3], 0, 2 * th + 2 - xp.shape[2]))
    bt, gm, at = (m.to(xp) for m in _WINOGRAD)
    tiles = xp.unfold(2, 4, 2).unfold(3, 4, 2)  # (n, c, th, tw, 4, 4)
    v = bt @ tiles @ bt.T
    u = gm @ w @ gm.T  # (o, c/g, 4, 4)
    v = v.reshape(n, g, c // g, th * tw, 16).permute(4, 1, 2, 0, 3).reshape(16, g, c // g, n * th * tw)
    u = u.reshape(g, o // g, c // g, 16).permute(3, 0, 1, 2)
    m = (u @ v).reshape(4, 4, o, n, th, tw).permute(3, 2, 4, 5, 0, 1)  # (n, o, th, tw, 4, 4)
    y = (at @ m @ at.T).permute(0, 1, 2, 4, 3, 5).reshape(n, o, 2 * th, 2 * tw)
    return finish(y[:, :, :ho, :wo], b, x, weight, out_dtype)


def fft(layer: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """FFT convolution: cross-correlation as a pointwise product of ``rfft2`` spectra, summed over channels.

    The transform size is the padded input, so the circular wrap-around only touches outputs that
    are cropped away. Dilation inserts zeros in the kernel; stride keeps every ``stride``-th output
    (correct, but wasteful, so ``auto`` will rarely pick it there).
    """
    xp, w, b, out_dtype = operands(layer, x, weight, bias)
    ho, wo = out_size(layer, xp)
    n, c, h, wd = xp.shape
    o, g = w.shape[0], layer.groups
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    if (dh, dw) != (1, 1):
        dilated = w.new_zeros(o, c // g, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        dilated[:, :, ::dh, ::dw] = w
        w = dilated
    xf = torch.fft.rfft2(xp).reshape(n, g, c // g, h, -1)
    wf = torch.fft.rfft2(w, s=(h, wd)).reshape(g, o // g, c // g, h, -1)
    yf = torch.einsum("ngchw,gochw->ngohw", xf, wf.conj()).reshape(n, o, h, -1)
    y = torch.fft.irfft2(yf, s=(h, wd))
    return finish(y[:, :, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw], b, x, weight, out_dtype)
