"""Implicit hypergradient with ``H^-1 v`` solved by conjugate gradient on Hessian-vector products."""

from __future__ import annotations

from functools import partial

from ._context import HypergradContext, HypergradInfo
from ._curvature import curvature
from ._implicit import (
    check_every,
    compiled_hessian,
    default_tolerance,
    fused_iterations,
    gradient_residual,
    root_push,
)
from ._linsolve import conjugate_gradient
from ._method import Method
from ._tree import Params


def push(ctx: HypergradContext) -> tuple[Params, HypergradInfo]:
    """``-d/dx <grad_w f, H^-1 v>``; needs ``H + damping * I`` positive definite.

    With compiled products (``compile_hypergrad``) the iterations between two residual checks
    (``solver_check_every``) run as one captured graph, products and CG arithmetic together.
    """
    jacobian = curvature(ctx)
    products = compiled_hessian(ctx) if jacobian is None else None
    solve = partial(
        conjugate_gradient, iterations=ctx.config.iterations, tol=default_tolerance(ctx), check_every=check_every(ctx),
        indefinite=ctx.config.indefinite, repeat=fused_iterations(ctx, products),
    )
    return root_push(ctx, gradient_residual(ctx), solve, "cg", symmetric=True, compiled=lambda _: products, jacobian=jacobian)


METHOD = Method(
    "cg",
    "implicit differentiation, H^-1 v by conjugate gradient on Hessian-vector products",
    push,
    exact=True,
    curvature=True,
)
