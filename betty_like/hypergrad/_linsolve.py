"""Linear solvers over parameter dicts: pure functions ``solve(matvec, b) -> (x, SolveInfo)``.

They know nothing of models: ``matvec`` is any linear map on ``dict[str, Tensor]``. Damping,
precision policy and cross-process reduction are applied by wrapping ``matvec``, never by flags
here. Each returns the relative residual history so callers (``check_hypergradient``) can show
how far the solve got.

:class:`LinearSystem` makes a solve an autograd operation: its value comes from a solver, and its
derivative (in the right-hand side and in whatever the operator depends on) costs one more solve
with the transposed operator, never a graph of solver iterations. That is what lets pushes through
best responses compose across levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._tree import Params, axpy, detach, dot, grads, norm, scale, zeros_like

MatVec = Callable[[Params], Params]
Solver = Callable[[MatVec, Params], tuple[Params, "SolveInfo"]]
GraphMatVec = Callable[[Params, bool], Params]


@dataclass
class SolveInfo:
    """Diagnostics of one linear solve.

    ``residuals[k]`` is ``||b - A x_k|| / ||b||`` after iteration ``k + 1``.
    """

    solver: str
    iterations: int = 0
    residuals: list[float] = field(default_factory=list)
    converged: bool = False
    negative_curvature: bool = False

    @property
    def residual(self) -> float:
        return self.residuals[-1] if self.residuals else float("nan")


def conjugate_gradient(matvec: MatVec, b: Params, *, iterations: int, tol: float) -> tuple[Params, SolveInfo]:
    """Solve ``A x = b`` for symmetric positive definite ``A`` by conjugate gradient.

    Stops at ``tol`` relative residual, after ``iterations`` steps, or when it meets a direction
    of non-positive curvature (``A`` not positive definite there: add damping), which it reports.
    """
    info = SolveInfo("cg")
    x = zeros_like(b)
    r = dict(b)
    p = dict(b)
    rs = dot(r, r)
    b_norm = rs.sqrt()
    if float(b_norm) == 0.0:
        info.converged = True
        return x, info
    for _ in range(iterations):
        ap = matvec(p)
        curvature = dot(p, ap)
        if float(curvature) <= 0.0:
            info.negative_curvature = True
            break
        step = rs / curvature
        x = axpy(step, p, x)
        r = axpy(-step, ap, r)
        rs_next = dot(r, r)
        info.iterations += 1
        relative = float(rs_next.sqrt() / b_norm)
        info.residuals.append(relative)
        if relative <= tol:
            info.converged = True
            break
        p = axpy(rs_next / rs, p, r)
        rs = rs_next
    return x, info


def neumann(
    matvec: MatVec, b: Params, *, iterations: int, tol: float, alpha: float
) -> tuple[Params, SolveInfo]:
    """Solve ``A x = b`` by the Neumann series ``x = alpha * sum_j (I - alpha A)^j b``.

    Converges when the spectral radius of ``I - alpha A`` is below one (for a Hessian: ``alpha``
    below ``2 / L``). The next series term equals the current residual, so the residual history
    costs no extra products.
    """
    info = SolveInfo("neumann")
    term = dict(b)
    total = dict(b)
    b_norm = norm(b)
    if float(b_norm) == 0.0:
        info.converged = True
        return zeros_like(b), info
    for _ in range(iterations):
        term = axpy(-alpha, matvec(term), term)
        info.iterations += 1
        relative = float(norm(term) / b_norm)
        info.residuals.append(relative)
        if relative <= tol:
            info.converged = True
            total = axpy(1.0, term, total)
            break
        if not math.isfinite(relative) or relative > 1e12:
            raise FloatingPointError(
                f"Neumann series diverged (relative residual {relative:.3g} after {info.iterations} "
                f"iterations) with alpha={alpha}: use a smaller alpha (below 2 / largest Hessian "
                "eigenvalue), or the 'cg' method."
            )
        total = axpy(1.0, term, total)
    return scale(alpha, total), info


def dense(matvec: MatVec, b: Params) -> tuple[Params, SolveInfo]:
    """Materialise ``A`` column by column and solve in float64: the exact reference for small problems."""
    info = SolveInfo("dense")
    names = list(b)
    shapes = [b[n].shape for n in names]
    sizes = [b[n].numel() for n in names]
    flat_b = torch.cat([b[n].reshape(-1) for n in names]).to(torch.float64)
    columns = []
    for i in range(flat_b.numel()):
        unit = torch.zeros_like(flat_b)
        unit[i] = 1.0
        pieces = torch.split(unit, sizes)
        column = matvec(
            {n: piece.reshape(s).to(b[n].dtype) for n, piece, s in zip(names, pieces, shapes, strict=False)}
        )
        columns.append(torch.cat([column[n].reshape(-1) for n in names]).to(torch.float64))
    matrix = torch.stack(columns, dim=1)
    solution = torch.linalg.solve(matrix, flat_b)
    residual = torch.linalg.vector_norm(matrix @ solution - flat_b) / torch.linalg.vector_norm(flat_b)
    info.iterations = flat_b.numel()
    info.residuals.append(float(residual))
    info.converged = True
    pieces = torch.split(solution, sizes)
    return {
        n: piece.reshape(s).to(b[n].dtype) for n, piece, s in zip(names, pieces, shapes, strict=False)
    }, info


@dataclass(frozen=True)
class LinearSystem:
    """``A x = b`` with ``A`` given by products: ``matvec(u, create_graph)`` and its transpose ``rmatvec``.

    ``create_graph=True`` asks for a product that is itself differentiable (in ``u`` and in what
    ``A`` depends on); the solver's own iterations never ask for it.
    """

    matvec: GraphMatVec
    rmatvec: GraphMatVec
    solver: Solver

    def transposed(self) -> LinearSystem:
        return LinearSystem(self.rmatvec, self.matvec, self.solver)

    def solve(self, b: Params) -> tuple[Params, SolveInfo]:
        """``A^-1 b``; under grad mode differentiable in ``b`` and in ``A``'s dependencies.

        The value is the solver's answer ``x``. Derivatives come from two refinement steps
        ``y <- y + Z(b - A y)`` starting at ``x``, where ``Z`` is zero in value and its vector-Jacobian
        product is ``A^-T g`` (one more solve). One step gives ``dx = A^-1 (db - dA x)``, the exact
        first derivative; the second makes second derivatives exact too (``-2 A^-1 dA dx`` needs the
        graph of ``dx`` itself), which a level whose own Hessian goes through this solve needs.
        """
        x, info = self.solver(lambda u: self.matvec(u, False), detach(b))
        x = detach(x)
        if not torch.is_grad_enabled():
            return x, info
        keys = list(x)
        for _ in range(2):
            product = self.matvec(x, True)
            residual = [b[k] - product[k] for k in keys]
            if not any(r.requires_grad for r in residual):
                break
            corrections = _AdjointSolve.apply(self, keys, *residual)
            x = {k: x[k] + c for k, c in zip(keys, corrections, strict=True)}
        return x, info


class _AdjointSolve(torch.autograd.Function):
    """Zero in value; its vector-Jacobian product is a solve with the transposed system."""

    @staticmethod
    def forward(ctx, system: LinearSystem, keys: list[str], *residual: torch.Tensor):
        ctx.system = system
        ctx.keys = keys
        return tuple(torch.zeros_like(r) for r in residual)

    @staticmethod
    def backward(ctx, *cotangents: torch.Tensor):
        g = {k: c for k, c in zip(ctx.keys, cotangents, strict=True)}
        solution, _ = ctx.system.transposed().solve(g)  # differentiable again when this backward is
        return (None, None, *(solution[k] for k in ctx.keys))


def transpose(vjp: GraphMatVec, like: Params) -> GraphMatVec:
    """``u -> J u`` from ``u -> J^T u``: the derivative of the (linear) vjp in its argument, applied to ``u``."""
    def jvp(u: Params, create_graph: bool) -> Params:
        with torch.enable_grad():
            z = {k: torch.zeros_like(t, requires_grad=True) for k, t in like.items()}
            out = vjp(z, True)
            keys = list(out)
            return grads([out[k] for k in keys], z, grad_outputs=[u[k] for k in keys], create_graph=create_graph)

    return jvp
