"""The capability record every hypergradient method declares; the engine asks it, never a name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._context import HypergradContext, HypergradInfo
from ._tree import Params

Push = Callable[[HypergradContext], tuple[Params, HypergradInfo]]


@dataclass(frozen=True)
class Method:
    """A hypergradient method: how an upper problem's gradient passes through one lower solution.

    Attributes:
        name: the ``ProblemConfig.hypergrad`` value.
        summary: one line for docs and error messages.
        push: ``v -> v^T dw*/dx`` at the current solution, a pure function of a
            :class:`HypergradContext`; ``None`` for unrolled methods, whose steps carry the dependence.
        through_w: for unrolled methods, whether each step is differentiated with respect to the
            lower parameters themselves (``unroll``) or only through the upper ones (``first_order``).
        second_order: needs double backward through the lower problem's model.
        steps_optimizer: differentiates the user's optimizer update, so it needs a pure step for it.
        optimizers: the optimizer classes it accepts (``None``: any).
        exact: gives the exact hypergradient at a stationary point (up to solver tolerance).
        curvature: its linear system takes ``ProblemConfig(curvature=...)`` (Hessian or Gauss-Newton).
        needs_outputs: needs the lower loss split into model outputs and an output loss
            (``Problem.output_loss``) whatever the curvature.
    """

    name: str
    summary: str
    push: Push | None
    through_w: bool = True
    second_order: bool = True
    steps_optimizer: bool = False
    optimizers: tuple[type[torch.optim.Optimizer], ...] | None = None
    exact: bool = False
    curvature: bool = False
    needs_outputs: bool = False

    @property
    def unrolled(self) -> bool:
        return self.push is None
