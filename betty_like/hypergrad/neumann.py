"""Implicit hypergradient with the inverse Hessian approximated by a truncated Neumann series."""

from __future__ import annotations

from functools import partial

from ._context import HypergradContext, HypergradInfo
from ._curvature import curvature
from ._implicit import check_every, compiled_hessian, default_tolerance, gradient_residual, root_push
from ._linsolve import neumann
from ._method import Method
from ._tree import Params


def push(ctx: HypergradContext) -> tuple[Params, HypergradInfo]:
    """``-d/dx <grad_w f, H^-1 v>`` with ``H^-1 v`` from a Neumann series.

    ``alpha=None`` (the default) estimates the largest Hessian eigenvalue ``L`` by power iteration
    and uses ``1 / L``; the estimate is kept across solves (``ctx.eigenvalue``) and measured again
    every so often or when a series run with it diverges. The learning rate, the old default, is no safe choice: an Adam
    lower's learning rate has no relation to its Hessian (81 % error measured), and an SGD rate near
    ``2 / L`` makes the series diverge.

    A series that still diverges (an indefinite Hessian, far from a minimum) is solved again by MINRES
    (``ProblemConfig(indefinite="minres")``, the default; ``"fail"`` reports the divergence).
    """
    solve = partial(
        neumann,
        iterations=ctx.config.iterations,
        tol=default_tolerance(ctx),
        alpha=ctx.config.alpha,
        estimate=ctx.eigenvalue,
        check_every=check_every(ctx),
        indefinite=ctx.config.indefinite,
    )
    return root_push(ctx, gradient_residual(ctx), solve, "neumann", symmetric=True, compiled=compiled_hessian, jacobian=curvature(ctx))


METHOD = Method(
    "neumann",
    "implicit differentiation, H^-1 v by a Neumann series with step alpha",
    push,
    exact=True,
    curvature=True,
)
