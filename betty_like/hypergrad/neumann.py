"""Implicit hypergradient with the inverse Hessian approximated by a truncated Neumann series."""

from __future__ import annotations

from functools import partial

from ._context import HypergradContext, HypergradInfo
from ._implicit import default_tolerance, gradient_residual, root_push
from ._linsolve import neumann
from ._method import Method
from ._tree import Params


def push(ctx: HypergradContext) -> tuple[Params, HypergradInfo]:
    """``-d/dx <grad_w f, H^-1 v>`` with ``H^-1 v`` from a Neumann series.

    ``alpha`` defaults to the lower problem's (first group's) learning rate, for which the series
    is exactly reverse mode through gradient-descent steps at the current point (converges if
    ``alpha < 2 / L``).
    """
    alpha = ctx.config.alpha if ctx.config.alpha is not None else ctx.optimizer.learning_rate()
    if alpha <= 0:
        raise ValueError(
            f"neumann for problem {ctx.owner!r} needs a positive step size, but alpha defaults to the "
            f"learning rate, which is {alpha}: set ProblemConfig(alpha=...) below 2 / (largest Hessian eigenvalue)"
        )
    solve = partial(neumann, iterations=ctx.config.iterations, tol=default_tolerance(ctx), alpha=alpha)
    return root_push(ctx, gradient_residual(ctx), solve, "neumann", symmetric=True)


METHOD = Method(
    "neumann",
    "implicit differentiation, H^-1 v by a Neumann series with step alpha",
    push,
    exact=True,
)
