"""Implicit differentiation of the lower problem's own optimizer update map ``Phi``.

At a fixed point ``w* = Phi(w*, x)`` the residual is ``w - Phi(w, x)``; the linear system
``(I - dPhi/dw)^T u = v`` is solved by the fixed-point iteration ``u <- v + (dPhi/dw)^T u``, which
is reverse mode through repeated optimizer steps at the solution. For SGD this equals the Neumann
method with ``alpha = lr``; for Adam the preconditioner cancels at a stationary point, so the
result is still the implicit hypergradient.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch

from ._context import HypergradContext, HypergradInfo
from ._curvature import gauss_newton
from ._implicit import Residual, check_every, compiled_hessian, default_tolerance, root_push
from ._linsolve import GraphMatVec, MatVec, SolveInfo, Solver, neumann
from ._method import Method
from ._tree import Params, grads

if TYPE_CHECKING:
    from ..optim import FunctionalOptimizer


def update_residual(ctx: HypergradContext) -> Residual:
    """``r(w, x) = w - Phi(w, x)`` with ``Phi`` one step of the user's optimizer (state frozen).

    Under data parallel the objective's gradient on a rank is ``1 / ranks`` of the global one: the
    update is taken of the global gradient (the step the ranks take together, for any optimizer) and
    the residual divided back, so that the ranks' parts still sum to it.

    The division is there in one process too (by 1, exact), for the shape of the graph: where a product
    ``u -> (dr/dw)^T u`` is differentiated in ``u`` (a middle level's push at three levels), ``u`` enters
    it through the division's backward, so the derivatives of its two uses (the terms ``w`` and ``Phi``)
    are summed there, ``b + c``, before they meet what else reaches that vector, ``a``. Two ranks compute
    ``(b + c) / 2 + a / 2``; without the node one process computed ``(a + b) + c``, a rounding apart
    (1.7e-7 on the top gradient of the three-level test, docs/distributed.md).
    """

    def residual(w: Params, x: Params) -> Params:
        gradient = grads(ctx.objective(w, x), w, create_graph=True)
        if ctx.ranks > 1:
            gradient = {k: g * ctx.ranks for k, g in gradient.items()}
        stepped, _ = ctx.optimizer.step(w, gradient)
        return {k: (w[k] - stepped[k]) / ctx.ranks for k in w}

    return residual


class _LinearisedUpdate:
    """One optimizer step ``Phi(w, g)`` taken at the objective's gradient ``g`` held as a leaf, so that the
    products ``u -> (dr/dw)^T u = u - (dPhi/dw)^T u - C (dPhi/dg)^T u`` need the model only for ``C``,
    the curvature (a compiled Hessian, or Gauss-Newton products).

    Under data parallel ``g`` is the global gradient (``ranks`` times the rank's average) and ``C``'s
    products are each rank's own, summed over ranks by the solve: the rank's part of the product is
    ``(u - (dPhi/dw)^T u) / ranks - C_rank (dPhi/dg)^T u``.
    """

    def __init__(self, ctx: HypergradContext, w: Params, x: Params, curvature: GraphMatVec) -> None:
        self.keys = list(w)
        self.ranks = ctx.ranks
        self.curvature = curvature
        g = {k: (t.detach() * ctx.ranks).requires_grad_(True) for k, t in grads(ctx.objective(w, x), w).items()}
        stepped, _ = ctx.optimizer.step(w, g)
        self.outputs = [stepped[k] for k in self.keys]
        self.inputs = [w[k] for k in self.keys] + [g[k] for k in self.keys]

    def product(self, u: Params, create_graph: bool = False) -> Params:
        keys = self.keys
        found = torch.autograd.grad(
            self.outputs, self.inputs, [u[k] for k in keys], retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        through_w = {k: torch.zeros_like(u[k]) if p is None else p for k, p in zip(keys, found, strict=False)}
        through_g = {k: torch.zeros_like(u[k]) if p is None else p for k, p in zip(keys, found[len(keys) :], strict=True)}
        curved = self.curvature(through_g, create_graph)
        return {k: (u[k] - through_w[k]) / self.ranks - curved[k] for k in keys}


def compiled_update(ctx: HypergradContext) -> MatVec | None:
    """``u -> (dr/dw)^T u`` with ``H u`` compiled (``None``: eager products); see :class:`_LinearisedUpdate`."""
    hessian = compiled_hessian(ctx)
    if hessian is None:
        return None
    with torch.enable_grad():
        w = {k: t.detach().requires_grad_(True) for k, t in ctx.w.items()}
        update = _LinearisedUpdate(ctx, w, {k: t.detach() for k, t in ctx.x.items()}, lambda u, _: hessian(u))
    return update.product


def gauss_newton_update(ctx: HypergradContext) -> GraphMatVec:
    """``u -> (d(w - Phi)/dw)^T u`` with the Hessian inside ``dPhi/dw`` replaced by Gauss-Newton products.

    ``Phi(w, g)`` is the optimizer step at the gradient ``g = grad_w f``, so ``dPhi/dw`` is
    ``d_w Phi + d_g Phi H``: the partial in ``g`` is taken at the gradient's value, and ``H`` becomes
    ``G``. For SGD this is ``lr * G u``.
    """
    return _LinearisedUpdate(ctx, ctx.w, ctx.x, gauss_newton(ctx)).product


def symmetric_update(optimizer: FunctionalOptimizer) -> bool:
    """Whether ``d(w - Phi)/dw`` is a symmetric matrix: ``c * (s H + W)``, one scalar ``c`` and sign ``s`` for all parameters.

    SGD's update (state frozen) is ``w - lr * k * (s g + wd * w)``, with ``k`` the momentum buffer's
    (or Nesterov's) factor on the gradient, a scalar. Its Jacobian is symmetric when ``lr * k`` and
    ``s`` (``maximize``) are the same for every parameter (weight decay may differ: ``W`` is diagonal).
    Adam's ``g / sqrt(v)`` gives ``D H`` with ``D`` a diagonal of different entries: not symmetric.
    """
    if type(optimizer.optimizer) is not torch.optim.SGD:
        return False
    hyperparameters = optimizer.hyperparameters()
    scalars = set()
    for name, hp in hyperparameters.items():
        factor = 1.0
        if hp["momentum"]:
            factor = 1.0 if "momentum_buffer" not in optimizer.state.get(name, {}) else 1.0 - hp["dampening"]
            if hp["nesterov"]:
                factor = 1.0 + hp["momentum"] * factor
        scalars.add((float(hp["lr"]) * factor, bool(hp["maximize"])))
    return len(scalars) <= 1


def _named(solver: Solver) -> Solver:
    """``solver`` reporting itself as ``fixed_point`` (``fixed_point+minres`` after a MINRES restart)."""

    def solve(matvec: MatVec, b: Params) -> tuple[Params, SolveInfo]:
        x, info = solver(matvec, b)
        info.solver = info.solver.replace("neumann", "fixed_point", 1)
        return x, info

    return solve


def push(ctx: HypergradContext) -> tuple[Params, HypergradInfo]:
    """``v^T dw*/dx`` by implicit differentiation of the optimizer's update map.

    The iteration ``u <- v + (dPhi/dw)^T u`` is a Neumann series with ``alpha = 1`` on ``d(w - Phi)/dw``.
    Where that matrix is symmetric (:func:`symmetric_update`: SGD with one step scale for every
    parameter, a multiple of the Hessian plus weight decay) a diverging iteration is solved again by
    MINRES (``ProblemConfig(indefinite="minres")``, the default); elsewhere a divergence is reported.
    """
    if ctx.optimizer.learning_rate() <= 0:
        raise ValueError(
            f"fixed_point for problem {ctx.owner!r} differentiates its optimizer's update, which is the "
            "identity at learning rate 0: give the optimizer a positive learning rate, or use hypergrad='cg'"
        )
    indefinite = ctx.config.indefinite if symmetric_update(ctx.optimizer) else "fail"
    solve = _named(partial(
        neumann, iterations=ctx.config.iterations, tol=default_tolerance(ctx), alpha=1.0, check_every=check_every(ctx),
        indefinite=indefinite,
    ))
    jacobian = gauss_newton_update(ctx) if ctx.config.curvature == "gauss_newton" else None
    return root_push(ctx, update_residual(ctx), solve, "fixed_point", symmetric=False, compiled=compiled_update, jacobian=jacobian)


METHOD = Method(
    "fixed_point",
    "implicit differentiation of the optimizer's own update map (reverse mode through its steps at the solution)",
    push,
    steps_optimizer=True,
    exact=True,
    curvature=True,
)
