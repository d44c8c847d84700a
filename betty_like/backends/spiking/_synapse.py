"""k-bit quantized synapses (RRAM-like conductance levels) with a straight-through estimator.

The latent fp32 weight is what the optimizer trains; the forward pass reads it snapped to one of
``2**bits`` evenly spaced levels in ``[-w_max, w_max]`` (a differential pair of RRAM cells has a
finite set of programmable conductances). The gradient passes straight through the rounding to the
latent weight, and is zeroed where the latent weight lies outside the range (clipped STE), so
weights do not drift away from the levels they can reach.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def quantize(w: torch.Tensor, bits: int, w_max: float) -> torch.Tensor:
    """Snap ``w`` to ``2**bits`` levels in ``[-w_max, w_max]``; straight-through gradient.

    The rounding is replaced by the identity in backward (it is also its own derivative in double
    backward, i.e. the second derivative of the quantizer is taken as zero).
    """
    steps = 2**bits - 1
    clipped = torch.clamp(w, -w_max, w_max)
    level = torch.round((clipped + w_max) * (steps / (2 * w_max)))
    snapped = level * (2 * w_max / steps) - w_max
    return clipped + (snapped - clipped).detach()


class QuantizedLinear(nn.Module):
    """A synapse matrix ``y = x @ W_q.T`` with k-bit weights and optional device noise.

    Args:
        in_features, out_features: sizes.
        bits: levels are ``2**bits`` (3 bits = 8 RRAM levels by default); ``None`` keeps fp32.
        w_max: half-range of the levels; ``None`` picks ``2 / sqrt(in_features)``.
        d2d_sigma: device-to-device variability, a relative conductance error drawn once per synapse
            (a buffer, so it is saved with the module and fixed across uses).
        c2c_sigma: cycle-to-cycle read noise, a relative error drawn afresh on every forward call.
        seed: seed of the device-to-device draw, so one "chip" can be rebuilt.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int | None = 3,
        w_max: float | None = None,
        d2d_sigma: float = 0.0,
        c2c_sigma: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if bits is not None and (not isinstance(bits, int) or bits < 1):
            raise ValueError(f"bits={bits!r} must be an integer >= 1 (or None for fp32 weights)")
        if d2d_sigma < 0 or c2c_sigma < 0:
            raise ValueError(f"noise levels must be >= 0, got d2d_sigma={d2d_sigma}, c2c_sigma={c2c_sigma}")
        self.bits = bits
        self.w_max = 2.0 / math.sqrt(in_features) if w_max is None else float(w_max)
        if self.w_max <= 0:
            raise ValueError(f"w_max={w_max!r} must be positive")
        self.c2c_sigma = c2c_sigma
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features).uniform_(-self.w_max, self.w_max) / 2
        )
        gen = torch.Generator().manual_seed(seed)
        d2d = 1.0 + d2d_sigma * torch.randn(out_features, in_features, generator=gen)
        self.register_buffer("d2d", d2d)

    def effective_weight(self) -> torch.Tensor:
        """The weight the device applies: quantized, times its fixed device-to-device factor."""
        w = self.weight if self.bits is None else quantize(self.weight, self.bits, self.w_max)
        return w * self.d2d

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the synapses; ``weight`` reuses an :meth:`effective_weight` computed once per window."""
        w = self.effective_weight() if weight is None else weight
        if self.c2c_sigma > 0:
            w = w * (1.0 + self.c2c_sigma * torch.randn_like(w))
        return x @ w.t()
