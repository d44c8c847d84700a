"""Spike nonlinearity with selectable surrogate gradients.

A spike is the Heaviside step of ``x = v - threshold``; its true derivative is zero almost
everywhere, so training uses a surrogate derivative ``g'(x)`` in the backward pass while the
forward pass keeps the exact step. The backward is written with differentiable torch ops, so
double backward (needed by hypergradient methods that unroll or take Hessian-vector products)
works for every surrogate whose ``second_order`` flag is true, and the surrogate's slope may itself
be a learnable tensor (its gradient then flows through the backward pass only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...hypergrad import METHODS, get_method

# Hypergradient methods (ProblemConfig.hypergrad) that differentiate through gradients and so need a
# second derivative of every op on the path, spike surrogates included: read from the method
# registry's own ``second_order`` flags, the one source of truth (``first_order`` is among them: it
# drops only the Hessian in the lower parameters, not the mixed second derivative).
SECOND_ORDER_METHODS = tuple(name for name, method in METHODS.items() if method.second_order)


def _fast_sigmoid(x: torch.Tensor, slope: torch.Tensor | float) -> torch.Tensor:
    return 1.0 / (1.0 + slope * x.abs()) ** 2


def _arctan(x: torch.Tensor, slope: torch.Tensor | float) -> torch.Tensor:
    return (slope / 2.0) / (1.0 + (math.pi / 2.0 * slope * x) ** 2)


def _triangle(x: torch.Tensor, slope: torch.Tensor | float) -> torch.Tensor:
    return slope * torch.clamp(1.0 - slope * x.abs(), min=0.0)


def _straight_through(x: torch.Tensor, slope: torch.Tensor | float) -> torch.Tensor:
    return slope * (x.abs() < 0.5 / slope).to(x.dtype)


@dataclass(frozen=True)
class Surrogate:
    """A surrogate derivative for the spike step.

    Attributes:
        name: registry key (``fast_sigmoid``, ``arctan``, ``triangle``, ``straight_through``).
        slope: steepness; a float, or a tensor to learn it (e.g. from an upper problem).
        second_order: whether the derivative of ``g'`` is meaningful. ``straight_through`` is a
            box window whose derivative is a pair of Dirac deltas at its edges, which autograd
            would silently return as zero, so it is flagged first-order only and refused by
            :func:`check_hypergrad_support` for second-order hypergradient methods.
    """

    name: str
    slope: torch.Tensor | float
    second_order: bool

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """``g'(x)``, the surrogate derivative used in place of the Dirac delta."""
        return _DERIVATIVES[self.name](x, self.slope)


_DERIVATIVES: dict[str, Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]] = {
    "fast_sigmoid": _fast_sigmoid,
    "arctan": _arctan,
    "triangle": _triangle,
    "straight_through": _straight_through,
}
# Default slopes: fast sigmoid 25 (SuperSpike), arctan alpha=2 (SpikingJelly), triangle and box of
# unit height at 0 with a half width of 1 and 0.5 respectively.
DEFAULT_SLOPES = {"fast_sigmoid": 25.0, "arctan": 2.0, "triangle": 1.0, "straight_through": 1.0}
_FIRST_ORDER_ONLY = frozenset({"straight_through"})


def surrogate(name: str = "fast_sigmoid", slope: torch.Tensor | float | None = None) -> Surrogate:
    """Build a surrogate by name; ``slope=None`` takes the default for that surrogate.

    Formulas (``b`` = slope): fast sigmoid ``1 / (1 + b|x|)^2``; arctan
    ``(b/2) / (1 + (pi b x / 2)^2)``; triangle ``b * max(0, 1 - b|x|)``; straight-through (box)
    ``b * 1[|x| < 1/(2b)]``. Each integrates to 1 over x except the fast sigmoid (integral 2/b).
    """
    if name not in _DERIVATIVES:
        raise ValueError(f"unknown surrogate {name!r}: choose one of {sorted(_DERIVATIVES)}")
    slope = DEFAULT_SLOPES[name] if slope is None else slope
    if not isinstance(slope, torch.Tensor) and slope <= 0:
        raise ValueError(f"surrogate slope={slope!r} must be positive")
    return Surrogate(name, slope, second_order=name not in _FIRST_ORDER_ONLY)


def check_hypergrad_support(sur: Surrogate, method: str) -> None:
    """Refuse a second-order hypergradient method with a first-order-only surrogate.

    Call it when wiring a spiking problem into an engine; ``method`` is the lower problem's
    ``ProblemConfig.hypergrad``.
    """
    if get_method(method).second_order and not sur.second_order:
        safe = [name for name, m in METHODS.items() if not m.second_order]
        raise ValueError(
            f"hypergrad={method!r} differentiates through gradients, but the {sur.name!r} surrogate has no "
            f"usable second derivative: use a surrogate with second_order=True (fast_sigmoid, arctan, "
            f"triangle) or a first-order method, one that needs no second derivatives ({', '.join(safe)})"
        )


class _Spike(torch.autograd.Function):
    """Heaviside forward, ``grad * g'(x)`` backward (differentiable, so double backward works)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sur: Surrogate) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.sur = sur
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * ctx.sur.derivative(x), None


def spike(x: torch.Tensor, sur: Surrogate) -> torch.Tensor:
    """Return ``1[x > 0]`` with the surrogate derivative ``sur`` in the backward pass."""
    return _Spike.apply(x, sur)
