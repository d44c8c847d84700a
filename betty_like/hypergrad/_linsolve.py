"""Linear solvers over parameter dicts: pure functions ``solve(matvec, b) -> (x, SolveInfo)``.

They know nothing of models: ``matvec`` is any linear map on ``dict[str, Tensor]``. Damping,
precision policy and cross-process reduction are applied by wrapping ``matvec``, never by flags
here. Each returns the relative residual history so callers (``check_hypergradient``) can show
how far the solve got.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._tree import Params, axpy, dot, norm, scale, zeros_like

MatVec = Callable[[Params], Params]


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
