"""Implicit hypergradient with ``H^-1 v`` by conjugate gradient preconditioned with KFAC factors.

On an ill-conditioned lower problem (a trained network: condition numbers of 10^4 and more) plain CG
needs many Hessian-vector products; the Kronecker factors of its Linear and Conv2d layers
(:mod:`._kfac`) capture most of the curvature's spread, so preconditioned CG reaches the same
residual in far fewer products. The answer is still the exact solve's: the preconditioner changes
the path, not the fixed point. ``iterations=0`` is pure KFAC, ``x = P v``: no product with the
Hessian at all, exact only where the Kronecker factorisation is (one example through a single
linear layer), an approximation otherwise.

The factors cost one forward of the split objective (``output_loss``) plus one backward per output
entry of a row (10 for a 10-class classifier) and an eigendecomposition per factor. They are kept in
the lower problem's memo and refreshed after ``kfac_refresh`` solves (one per upper step in a
bilevel program); stale factors only slow the solve down, they never change its answer.
"""

from __future__ import annotations

from ._context import HypergradContext, HypergradInfo
from ._curvature import curvature, split_objective
from ._implicit import default_tolerance, gradient_residual, root_push
from ._kfac import KroneckerPreconditioner, blocks_of, build_preconditioner, layer_rows, rayleigh_scale
from ._linsolve import MatVec, SolveInfo, conjugate_gradient
from ._method import Method
from ._tree import Params


def _preconditioner(ctx: HypergradContext, matvec: MatVec, b: Params) -> tuple[KroneckerPreconditioner, int]:
    """The lower problem's preconditioner (from its memo unless due for a refresh) and the products it cost."""
    memo = ctx.memo.get("kfac")
    if memo is not None and memo[1] < ctx.config.kfac_refresh:
        ctx.memo["kfac"] = (memo[0], memo[1] + 1)
        return memo[0], 0
    if ctx.module is None:
        raise ValueError(f"problem {ctx.owner!r} uses hypergrad='kfac' but has no module to find layers in")
    blocks = blocks_of(ctx.module, ctx.owner, ctx.w)
    rows = layer_rows(lambda: split_objective(ctx), blocks)
    products = []

    def others(covered: set) -> float:
        if set(b) <= covered:
            return 0.0
        products.append(1)
        return rayleigh_scale(matvec, b, covered)

    preconditioner = build_preconditioner(blocks, rows, ctx.config.damping, ctx.config.kfac_damping, others)
    ctx.memo["kfac"] = (preconditioner, 1)
    return preconditioner, len(products)


def push(ctx: HypergradContext) -> tuple[Params, HypergradInfo]:
    """``-d/dx <grad_w f, H^-1 v>`` with ``H^-1 v`` from KFAC-preconditioned CG (pure KFAC at ``iterations=0``)."""
    tol = default_tolerance(ctx)

    def solve(matvec: MatVec, b: Params) -> tuple[Params, SolveInfo]:
        preconditioner, setup_products = _preconditioner(ctx, matvec, b)
        x, info = conjugate_gradient(
            matvec, b, iterations=ctx.config.iterations, tol=tol, preconditioner=preconditioner,
            indefinite=ctx.config.indefinite,
        )
        info.solver = "kfac" if ctx.config.iterations == 0 else "kfac-" + info.solver
        info.products += setup_products
        return x, info

    return root_push(ctx, gradient_residual(ctx), solve, "kfac", symmetric=True, jacobian=curvature(ctx))


METHOD = Method(
    "kfac",
    "implicit differentiation, H^-1 v by conjugate gradient preconditioned with KFAC factors (iterations=0: pure KFAC)",
    push,
    exact=True,
    curvature=True,
    needs_outputs=True,
)
