"""The one implicit-differentiation core shared by neumann, cg and fixed_point.

At a root ``r(w*, x) = 0`` the implicit function theorem gives ``v^T dw*/dx = -(dr/dx)^T u`` with
``(dr/dw)^T u = v``. The methods differ only in the residual ``r`` (the gradient of the objective,
or ``w - Phi(w)`` for an optimizer update ``Phi``) and in the solver for ``u``. Products with
``(dr/dw)^T`` are vector-Jacobian products on a residual computed once with ``create_graph=True``:
no Jacobian or Hessian is ever formed. The solve is a :class:`~._linsolve.LinearSystem`, so when a
deeper level differentiates this push (its own stationarity goes through this best response), the
push is exact to that order too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ._context import HypergradContext, HypergradInfo, _identity
from ._linsolve import CompiledOperator, GraphMatVec, LinearSystem, MatVec, Repeat, Solver, transpose
from ._tree import Params, axpy, grads, scale

Residual = Callable[[Params, Params], Params]


def gradient_residual(ctx: HypergradContext) -> Residual:
    """``r(w, x) = grad_w f(w, x)``: stationarity of the objective (symmetric Jacobian: the Hessian)."""

    def residual(w: Params, x: Params) -> Params:
        return grads(ctx.objective(w, x), w, create_graph=True)

    return residual


def _damped(matvec: GraphMatVec, damping: float) -> GraphMatVec:
    """``u -> A u + damping * u``: ridge regularisation of the system."""
    if damping == 0.0:
        return matvec
    return lambda u, create_graph: axpy(damping, u, matvec(u, create_graph))


def compiled_hessian(ctx: HypergradContext) -> CompiledOperator | None:
    """The compiled product ``u -> H u`` of a gradient residual's Jacobian (``None``: eager products)."""
    return ctx.compiled_hvp() if ctx.compiled_hvp is not None else None


def fused_iterations(ctx: HypergradContext, products: CompiledOperator | None) -> Repeat | None:
    """A solver's iterations between two checks captured with the compiled products as one graph.

    Only where the products enter the solve as they are: a precision or cross-process wrap of each
    product (fp16 unit norms, data-parallel sums) stays eager, and so do its iterations (``None``).
    """
    if products is None or ctx.matvec_wrap(_identity) is not _identity:
        return None
    return partial(products.repeat, damping=ctx.config.damping)


def root_push(
    ctx: HypergradContext,
    residual: Residual,
    solver: Solver,
    method: str,
    symmetric: bool,
    compiled: Callable[[HypergradContext], MatVec | None] | None = None,
    jacobian: GraphMatVec | None = None,
) -> tuple[Params, HypergradInfo]:
    """``v^T dw*/dx`` for ``w*`` defined by ``residual(w*, x) = 0``.

    ``jacobian`` replaces the products ``u -> (dr/dw)^T u`` of the linear system (Gauss-Newton
    curvature in place of the Hessian); the push through ``dr/dx`` is always the residual's own.
    Otherwise ``compiled(ctx)`` may give a faster ``(dr/dw)^T u`` for the solver's iterations (never
    differentiated); products that carry a graph always come from the residual's own graph.
    """
    r = residual(ctx.w, ctx.x)
    keys = list(r)
    outputs = [r[k] for k in keys]
    fast = compiled(ctx) if compiled is not None and jacobian is None else None

    def vjp_w(u: Params, create_graph: bool) -> Params:
        return grads(outputs, ctx.w, grad_outputs=[u[k] for k in keys], retain_graph=True, create_graph=create_graph)

    chosen = vjp_w if jacobian is None else jacobian

    def product(u: Params, create_graph: bool) -> Params:
        return fast(u) if fast is not None and not create_graph else chosen(u, create_graph=create_graph)

    def wrapped(raw: GraphMatVec) -> GraphMatVec:
        """Precision and cross-process sums wrap each product itself, after any transposition: the
        transpose of a product summed over ranks would sum the cotangent too (each rank would get
        ``world`` times its own part), and a unit-norm product has no derivative at zero."""
        return lambda u, create_graph: ctx.matvec_wrap(partial(raw, create_graph=create_graph))(u)

    matvec = _damped(wrapped(product), ctx.config.damping)
    rmatvec = matvec if symmetric else _damped(wrapped(transpose(chosen, ctx.v)), ctx.config.damping)
    system = LinearSystem(matvec, rmatvec, solver, ctx.shared)
    with torch.set_grad_enabled(ctx.create_graph):
        u, solve_info = system.solve(ctx.v)
    pushed = grads(
        outputs, ctx.x, grad_outputs=[u[k] for k in keys], create_graph=ctx.create_graph, retain_graph=ctx.create_graph
    )
    return scale(-1.0, pushed), HypergradInfo(ctx.owner, method, solve_info)


def default_tolerance(ctx: HypergradContext) -> float:
    """The configured tolerance, or one the parameter dtype can reach."""
    if ctx.config.tol is not None:
        return ctx.config.tol
    dtype = next(iter(ctx.w.values())).dtype
    return {8: 1e-12, 4: 1e-6}.get(dtype.itemsize, 1e-3)


def check_every(ctx: HypergradContext) -> int:
    """Iterations between a solver's host reads: the configured number, else 1 on the CPU and 10 elsewhere."""
    if ctx.config.solver_check_every is not None:
        return ctx.config.solver_check_every
    return 1 if next(iter(ctx.w.values())).device.type == "cpu" else 10
