"""The one implicit-differentiation core shared by neumann, cg and fixed_point.

At a root ``r(w*, lam) = 0`` the implicit function theorem gives
``v^T dw*/dlam = -(dr/dlam)^T u`` with ``(dr/dw)^T u = v``. The methods differ only in the
residual ``r`` (the gradient of the inner loss, or ``w - Phi(w)`` for an optimizer update ``Phi``)
and in the solver for ``u``. Products with ``(dr/dw)^T`` are vector-Jacobian products on a residual
computed once with ``create_graph=True``: no Jacobian or Hessian is ever formed.
"""

from __future__ import annotations

from collections.abc import Callable

from ._context import HypergradContext, HypergradInfo
from ._linsolve import MatVec, SolveInfo
from ._tree import Params, axpy, grads, scale

Residual = Callable[[Params, Params], Params]
Solver = Callable[[MatVec, Params], tuple[Params, SolveInfo]]


def gradient_residual(ctx: HypergradContext) -> Residual:
    """``r(w, lam) = grad_w f(w, lam)``: stationarity of the inner loss."""

    def residual(w: Params, lam: Params) -> Params:
        return grads(ctx.inner_loss(w, lam), w, create_graph=True)

    return residual


def damped(matvec: MatVec, damping: float) -> MatVec:
    """``u -> A u + damping * u``: ridge regularisation of the system as a matvec wrapper."""
    if damping == 0.0:
        return matvec
    return lambda u: axpy(damping, u, matvec(u))


def root_vjp(
    ctx: HypergradContext, residual: Residual, solve: Solver, method: str
) -> tuple[Params, HypergradInfo]:
    """``v^T dw*/dlam`` for ``w*`` defined by ``residual(w*, lam) = 0``."""
    w = {k: t.detach().requires_grad_(True) for k, t in ctx.w.items()}
    lam = {k: t.detach().requires_grad_(True) for k, t in ctx.lam.items()}
    r = residual(w, lam)
    names = list(r)
    outputs = [r[n] for n in names]

    def vjp_w(u: Params) -> Params:
        return grads(outputs, w, grad_outputs=[u[n] for n in names], retain_graph=True)

    u, solve_info = solve(ctx.matvec_wrap(damped(vjp_w, ctx.config.damping)), ctx.v)
    pushed = grads(outputs, lam, grad_outputs=[u[n] for n in names])
    return scale(-1.0, pushed), HypergradInfo(method, solve_info)


def default_tolerance(ctx: HypergradContext) -> float:
    """The configured tolerance, or one the parameter dtype can reach."""
    if ctx.config.tol is not None:
        return ctx.config.tol
    dtype = next(iter(ctx.w.values())).dtype
    return {8: 1e-12, 4: 1e-6}.get(dtype.itemsize, 1e-3)
