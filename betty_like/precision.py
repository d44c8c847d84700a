"""Mixed precision: forwards in bf16/fp16 under autocast, second-order arithmetic in fp32.

The forward and first-order backward of every step run under ``torch.autocast``. What makes a
hypergradient (the lower loss a push differentiates twice, the Hessian-vector products, the solver
vectors, darts/sama's perturbed passes, the graph an unrolled step keeps) runs in fp32 by default
(``ProblemConfig(hvp_precision="fp32")``): the lower loss is evaluated again with autocast off, so
its graph holds no low-precision op. Parameters and accumulated gradients stay fp32 throughout.

Measured on the digits MLP (issue 18): a cg hypergradient through a bf16 autocast graph has cosine
0.9956 with fp32; with fp32 HVPs under a bf16 forward, 0.9995.

fp16 needs loss scaling. One :class:`LossScaler` per engine scales every loss that is
differentiated (the upper loss of a hypergradient included), checks the whole unscaled gradient,
and on an inf/NaN skips the step, halves the scale and logs the problem's name. torch's
``GradScaler`` only inspects ``.grad``, never ``autograd.grad`` results, hence this one. A scaled
cotangent also enters the linear solves; with fp16 HVPs (``hvp_precision="autocast"``) the products
would overflow at scale 4096, so under fp16 each product is taken on a unit-norm direction
(:func:`unit_norm`) and scaled back in fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from .hypergrad._linsolve import MatVec
from .hypergrad._tree import Params, norm, scale

log = logging.getLogger("betty_like")

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def unit_norm(matvec: MatVec) -> MatVec:
    """``u -> |u| * A(u / |u|)``: the product is taken on a unit vector, so fp16 intermediates cannot overflow."""

    def product(u: Params) -> Params:
        size = norm(u)
        safe = torch.where(size > 0, size, torch.ones_like(size))
        return scale(safe, matvec(scale(1.0 / safe, u)))

    return product


def _identity(function: Any) -> Any:
    return function


class LossScaler:
    """GradScaler's arithmetic for ``autograd.grad`` results: scale, check, halve on overflow, grow when stable."""

    def __init__(self, init_scale: float, growth_interval: int = 2000) -> None:
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped: dict[str, int] = {}

    def accept(self, name: str, gradient: Params) -> bool:
        """Whether ``gradient`` (already unscaled) is finite; if not, halve the scale and log ``name``."""
        finite = all(bool(torch.isfinite(g).all()) for g in gradient.values())
        if not finite:
            self.skipped[name] = self.skipped.get(name, 0) + 1
            log.warning(
                "problem %r: inf/NaN in its fp16 gradient at loss scale %g: step skipped, scale halved to %g",
                name,
                self.scale,
                self.scale / 2,
            )
            self.scale /= 2
            self.good_steps = 0
            return False
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2
        return True


class Precision:
    """The engine's precision policy: autocast scopes, fp32 pushes, loss scaling (fp16)."""

    def __init__(self, precision: str, device_type: str, loss_scale: float) -> None:
        self.name = precision
        self.dtype = DTYPES[precision]
        self.device_type = device_type
        self.scaler = LossScaler(loss_scale) if precision == "fp16" else None

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 unless fp16)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def forward(self, config: Any = None, second_order: bool = False) -> AbstractContextManager:
        """Autocast for a step; a graph kept for second order (an unrolled step) stays fp32 unless asked."""
        if self.dtype is None or (second_order and config.hvp_precision == "fp32"):
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def push_wrap(self, config: Any) -> Callable[[Callable], Callable]:
        """A push of a problem with ``config`` runs with autocast off under ``hvp_precision="fp32"``."""
        if self.dtype is None or config.hvp_precision != "fp32":
            return _identity

        def wrap(push: Callable) -> Callable:
            def full_precision(ctx: Any) -> Any:
                with torch.autocast(self.device_type, enabled=False):
                    return push(ctx)

            return full_precision

        return wrap

    def matvec_wrap(self) -> Callable[[MatVec], MatVec]:
        """Applied to every Hessian-vector product: unit-norm directions under fp16."""
        return unit_norm if self.scaler is not None else _identity

    def unscale(self, loss: Tensor, gradient: Params) -> tuple[Tensor, Params]:
        """A scaled loss and its gradient divided back by the loss scale (a graph, if any, is kept)."""
        s = self.scale
        return (loss, gradient) if s == 1.0 else (loss / s, {k: g / s for k, g in gradient.items()})

    def accept(self, name: str, gradient: Params) -> bool:
        """Whether the step of ``name`` may commit ``gradient``: always, except an fp16 overflow."""
        return self.scaler is None or self.scaler.accept(name, gradient)


def device_type(device: torch.device | None, modules: list[torch.nn.Module]) -> str:
    """The autocast device type: the engine's device, else where the first parameter lives."""
    if device is not None:
        return device.type
    for module in modules:
        for p in module.parameters():
            return p.device.type
    return "cpu"

