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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from ._tree import Params, axpy, detach, dot, grads, norm, scale, zeros_like

MatVec = Callable[[Params], Params]
Solver = Callable[[MatVec, Params], tuple[Params, "SolveInfo"]]
GraphMatVec = Callable[[Params, bool], Params]


OUTCOMES = ("converged", "out_of_iterations", "diverged", "negative_curvature", "non_finite", "non_finite_input")
FAILURES = ("diverged", "negative_curvature", "non_finite")
_GROWTH_WINDOW = 5  # consecutive growing residuals that, with a doubling since the best one, mean divergence


@dataclass
class SolveInfo:
    """Diagnostics of one linear solve.

    ``residuals[k]`` is ``||b - A x_k|| / ||b||`` after iteration ``k + 1``. ``outcome`` is one of
    :data:`OUTCOMES`: ``converged`` (reached ``tol``), ``out_of_iterations`` (a legitimate budget; the
    answer is as good as its last residual), or a failure (:data:`FAILURES`): ``diverged`` (the residual
    grew: a Neumann or fixed-point series whose step is too large for the curvature), ``non_finite`` (a
    Hessian-vector product or the iteration produced NaN/inf), ``negative_curvature`` (conjugate gradient
    met a non-positive direction and no valid continuation was allowed). ``non_finite_input``: the
    right-hand side was already NaN/inf, which is the caller's fault, not the solver's (not a failure
    here: it is reported where it came from). ``negative_curvature`` as a flag
    says the system was found indefinite, also when the solve continued validly with MINRES.
    """

    solver: str
    iterations: int = 0
    residuals: list[float] = field(default_factory=list)
    converged: bool = False
    negative_curvature: bool = False
    outcome: str = "out_of_iterations"
    alpha: float | None = None  # the Neumann step actually used (estimated when not configured)
    products: int = 0  # matrix-vector (Hessian-vector) products this solve made, power iterations included
    estimated: bool = False  # a Neumann solve that (re-)estimated the largest eigenvalue for its alpha

    @property
    def residual(self) -> float:
        return self.residuals[-1] if self.residuals else float("nan")

    @property
    def failed(self) -> bool:
        return self.outcome in FAILURES

    def finish(self, outcome: str) -> SolveInfo:
        self.outcome = outcome
        self.converged = outcome == "converged"
        return self

    def describe(self) -> str:
        """One line: outcome, iterations and the residual history (first, best, last few)."""
        history = self.residuals
        shown = history if len(history) <= 6 else [*history[:2], *history[-4:]]
        text = ", ".join(f"{r:.3g}" for r in shown)
        if len(history) > 6:
            text = text.replace(f"{shown[1]:.3g}, ", f"{shown[1]:.3g}, ..., ", 1)
        best = min(history) if history and all(math.isfinite(r) for r in history) else float("nan")
        step = "" if self.alpha is None else f", alpha {self.alpha:.4g}" + (" (estimated now)" if self.estimated else "")
        return (
            f"{self.solver} {self.outcome} after {self.iterations} iterations ({self.products} products){step}; "
            "relative residuals "
            f"[{text}] (best {best:.3g})"
        )


def _bad_input(b_norm: Tensor, info: SolveInfo) -> bool:
    """A NaN/inf right-hand side: reported as such, and passed on (the NaN must stay visible)."""
    if math.isfinite(float(b_norm)):
        return False
    info.residuals.append(float("nan"))
    info.finish("non_finite_input")
    return True


def _unknown(b: Params) -> Params:
    """The answer of a solve that met NaN/inf: NaN, so that no finite guess passes for it downstream."""
    return {k: torch.full_like(t, float("nan")) for k, t in b.items()}


def _verdict(residuals: list[float], tol: float) -> str | None:
    """The outcome a residual history already decides (``None``: keep iterating)."""
    last = residuals[-1]
    if not math.isfinite(last):
        return "non_finite"
    if last <= tol:
        return "converged"
    if last > 1e12:
        return "diverged"
    recent = residuals[-_GROWTH_WINDOW - 1 :]
    growing = len(recent) == _GROWTH_WINDOW + 1 and all(b > a for a, b in zip(recent, recent[1:], strict=False))
    if growing and last > 2.0 * min(residuals):
        return "diverged"
    return None


def _final(residuals: list[float]) -> str:
    """Out of iterations, or diverged if the series was still growing when the budget ended."""
    recent = residuals[-4:]
    if len(recent) == 4 and all(b > a for a, b in zip(recent, recent[1:], strict=False)) and recent[-1] > min(residuals):
        return "diverged"
    return "out_of_iterations"


class _Checks:
    """Per-iteration scalars kept on the device and read on the host every ``every`` iterations and at the end.

    A host read (``float(t)``, ``.item()``, ``bool(t)``) waits for the device: on a GPU, one per
    iteration stalls the solve on every product. One read of the stacked scalars per check costs one
    synchronisation however many iterations it covers, and the residual history stays complete.
    """

    def __init__(self, every: int, iterations: int) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"check_every={every!r} is invalid: use an integer >= 1")
        self.every, self.iterations, self.pending = every, iterations, []

    def add(self, *scalars: Tensor) -> bool:
        """Keep this iteration's scalars; returns whether a check is due now."""
        self.pending.append(torch.stack([t.reshape(()).to(torch.float64) for t in scalars]))
        return len(self.pending) % self.every == 0 or len(self.pending) == self.iterations

    def read(self) -> list[list[float]]:
        """The scalars of the iterations since the last check (one host synchronisation)."""
        start = (len(self.pending) - 1) // self.every * self.every
        return torch.stack(self.pending[start:]).tolist()


def _live(*conditions: Tensor) -> Tensor:
    """A device-side flag: the iteration may still change the answer (nothing has ended it yet)."""
    flag = conditions[0]
    for c in conditions[1:]:
        flag = flag & c
    return flag


def _counts_products(solver: Callable[..., tuple[Params, SolveInfo]]) -> Callable[..., tuple[Params, SolveInfo]]:
    """``solver`` with ``info.products``: how many times it called ``matvec`` (the cost that matters)."""

    @functools.wraps(solver)
    def counted_solver(matvec: MatVec, b: Params, **options: object) -> tuple[Params, SolveInfo]:
        count = 0

        def counted(u: Params) -> Params:
            nonlocal count
            count += 1
            return matvec(u)

        x, info = solver(counted, b, **options)
        info.products += count  # plus those a compiled block made
        return x, info

    return counted_solver


class CGState(NamedTuple):
    """Conjugate gradient between two iterations, tensors only: a compiled solver block takes and returns it.

    ``live`` is the device-side flag that nothing has ended the iteration yet; ``b_norm`` and ``tol``
    (in the residual's dtype) ride along so that a block needs no Python number that changes per solve.
    """

    x: Params
    r: Params
    p: Params
    rz: Tensor
    live: Tensor
    b_norm: Tensor
    tol: Tensor


Step = Callable[[MatVec, Any], tuple[Any, Tensor]]
Repeat = Callable[[Step, Any, int], tuple[Any, Tensor]]


class CompiledOperator(Protocol):
    """Compiled products ``u -> H u`` that can also run a solver's iterations with them fused in.

    ``repeat(step, state, n, damping)`` equals ``n`` calls of ``step`` on ``u -> H u + damping * u``.
    """

    def __call__(self, u: Params) -> Params: ...

    def repeat(self, step: Step, state: Any, n: int, damping: float) -> tuple[Any, Tensor]: ...


def cg_step(matvec: MatVec, state: CGState, preconditioner: MatVec | None = None) -> tuple[CGState, Tensor]:
    """One (preconditioned) conjugate-gradient iteration, and its ``(curvature, relative residual)`` in float64.

    A pure function of tensors, so that ``n`` of them can be captured as one graph (a solver block);
    once the iteration is no longer ``live`` its steps leave the iterate unchanged.
    """
    x, r, p, rz, live, b_norm, tol = state
    ap = matvec(p)
    curvature = dot(p, ap)
    live = _live(live, curvature > 0, torch.isfinite(curvature))
    step = torch.where(live, rz / curvature, torch.zeros_like(rz))
    x = axpy(step, p, x)
    r = axpy(-step, ap, r)
    z = r if preconditioner is None else preconditioner(r)
    rz_next = torch.where(live, dot(r, z), rz)
    relative = norm(r) / b_norm
    live = live & (relative > tol)
    p = axpy(torch.where(live, rz_next / rz, torch.zeros_like(rz)), p, z)
    row = torch.stack([curvature.reshape(()).to(torch.float64), relative.reshape(()).to(torch.float64)])
    return CGState(x, r, p, rz_next, live, b_norm, tol), row


def iterate(matvec: MatVec, step: Step, state: Any, n: int) -> tuple[Any, Tensor]:
    """``n`` iterations of ``step`` on ``matvec``, their rows of scalars stacked (read on the host in one go)."""
    rows = []
    for _ in range(n):
        state, row = step(matvec, state)
        rows.append(row)
    return state, torch.stack(rows)


@_counts_products
def conjugate_gradient(
    matvec: MatVec,
    b: Params,
    *,
    iterations: int,
    tol: float,
    indefinite: str = "minres",
    preconditioner: MatVec | None = None,
    check_every: int = 1,
    repeat: Repeat | None = None,
) -> tuple[Params, SolveInfo]:
    """Solve ``A x = b`` for symmetric ``A`` by (preconditioned) conjugate gradient.

    CG needs ``A`` positive definite. When it meets a direction of non-positive curvature, its
    iterate is no approximation of the answer (on a saddle it can be exactly zero, or of the wrong
    sign), so it is never returned: with ``indefinite="minres"`` the solve starts again with MINRES,
    valid for any symmetric nonsingular ``A``, on the remaining budget (at least half of
    ``iterations``); with ``indefinite="fail"`` it reports ``negative_curvature`` and returns zeros.

    Curvature and residual are read on the host every ``check_every`` iterations (:class:`_Checks`).
    Between checks the iteration stops itself on the device: once it converges, or meets non-positive
    or non-finite curvature, its later steps leave the iterate unchanged, so the answer and the history
    are those of a check at every iteration.

    ``repeat(step, state, n)`` runs the ``n`` iterations between two checks with ``A``'s products
    fused into them (a compiled solver block, ``compile_hypergrad``; it must compute ``A`` as ``matvec``
    does); they count as ``n`` products. ``None``: each iteration runs eagerly on ``matvec``.

    A ``preconditioner`` ``P ~ A^-1`` (symmetric positive definite) gives PCG started from ``P b``:
    with ``iterations=0`` the answer is ``P b`` itself (no product with ``A`` at all), and every
    iteration improves on it. Its residual is the true one, ``||b - A x|| / ||b||``.
    """
    info = SolveInfo("cg" if preconditioner is None else "pcg")
    _Checks(check_every, iterations)  # validates check_every
    if repeat is not None and preconditioner is not None:
        raise ValueError("conjugate_gradient: a compiled block (repeat) runs unpreconditioned CG only")
    b_norm = norm(b)
    if _bad_input(b_norm, info):
        return dict(b), info
    if float(b_norm) == 0.0:
        return zeros_like(b), info.finish("converged")
    if preconditioner is None:
        x, r = zeros_like(b), dict(b)
        z = r
    else:
        x = preconditioner(b)
        if iterations == 0:
            return x, info.finish("out_of_iterations")
        r = axpy(-1.0, matvec(x), b)
        z = preconditioner(r)
    live = torch.ones((), dtype=torch.bool, device=b_norm.device)
    p = {k: t.clone() for k, t in z.items()}  # not an alias of r: a compiled block guards on its inputs' aliasing
    state = CGState(x, r, p, dot(r, z), live, b_norm, torch.tensor(tol, dtype=b_norm.dtype, device=b_norm.device))
    step = functools.partial(cg_step, preconditioner=preconditioner) if preconditioner is not None else cg_step
    done = 0
    while done < iterations:
        n = min(check_every, iterations - done)
        if repeat is None:
            state, rows = iterate(matvec, step, state, n)
        else:
            state, rows = repeat(step, state, n)
            info.products += n
        done += n
        outcome = _cg_outcome(rows.tolist(), info, tol)
        if outcome == "negative_curvature":
            return _continue_indefinite(matvec, b, (iterations, tol, check_every), indefinite, info)
        if outcome is not None:
            return (_unknown(b) if outcome == "non_finite" else state.x), info.finish(outcome)
    return state.x, info.finish("out_of_iterations")


def _cg_outcome(rows: list[list[float]], info: SolveInfo, tol: float) -> str | None:
    """Walk the iterations since the last check in order; the first that ends the solve decides."""
    for curvature, relative in rows:
        if not math.isfinite(curvature):
            info.residuals.append(float("nan"))
            return "non_finite"
        if curvature <= 0.0:
            return "negative_curvature"
        info.iterations += 1
        info.residuals.append(relative)
        verdict = _verdict(info.residuals, tol)
        if verdict is not None and verdict != "diverged":  # CG's residual may rise on its way down
            return verdict
    return None


def _continue_indefinite(
    matvec: MatVec, b: Params, settings: tuple[int, float, int], indefinite: str, info: SolveInfo
) -> tuple[Params, SolveInfo]:
    """CG met non-positive curvature: start again with MINRES on the remaining budget, or fail."""
    info.negative_curvature = True
    if indefinite != "minres":
        return zeros_like(b), info.finish("negative_curvature")
    return _restart_with_minres(matvec, b, settings, info)


def _restart_with_minres(
    matvec: MatVec, b: Params, settings: tuple[int, float, int], info: SolveInfo
) -> tuple[Params, SolveInfo]:
    """Solve again from zero with MINRES on the remaining budget (at least half of ``iterations``).

    The failed solve's history stays in ``info``, followed by MINRES's; ``info.solver`` gets ``+minres``.
    """
    iterations, tol, check_every = settings
    budget = max(iterations - info.iterations, (iterations + 1) // 2)
    x, rest = minres(matvec, b, iterations=budget, tol=tol, check_every=check_every)
    info.solver += "+minres"
    info.iterations += rest.iterations
    info.residuals.extend(rest.residuals)
    return x, info.finish(rest.outcome)


@_counts_products
def minres(matvec: MatVec, b: Params, *, iterations: int, tol: float, check_every: int = 1) -> tuple[Params, SolveInfo]:
    """Solve ``A x = b`` for symmetric, possibly indefinite ``A`` by MINRES (Paige and Saunders, 1975).

    Each iterate minimises ``||b - A x||`` over the Krylov space, so the residual never grows and a
    truncated iterate is still the best answer that space holds. One product per iteration, like CG.
    The residual is the recurrence's estimate (exact in exact arithmetic). The recurrence's scalars
    stay on the device; they are read every ``check_every`` iterations (see :func:`conjugate_gradient`).
    """
    info = SolveInfo("minres")
    x = zeros_like(b)
    b_norm = norm(b)
    if _bad_input(b_norm, info):
        return dict(b), info
    if float(b_norm) == 0.0:
        return x, info.finish("converged")
    beta1 = b_norm.to(torch.float64)
    zero = torch.zeros_like(beta1)
    r1, r2, y = dict(b), dict(b), dict(b)
    beta, old_beta, dbar, epsilon, phibar, cs, sn = beta1, beta1, zero, zero, beta1, zero - 1.0, zero
    w, w2 = zeros_like(b), zeros_like(b)
    checks = _Checks(check_every, iterations)
    live = torch.ones((), dtype=torch.bool, device=beta1.device)
    for k in range(iterations):
        v = scale(1.0 / torch.where(beta == 0, 1.0, beta), y)
        y = matvec(v)
        if k > 0:
            y = axpy(-beta / old_beta, r1, y)
        alfa = dot(v, y).to(torch.float64)
        y = axpy(-alfa / torch.where(beta == 0, 1.0, beta), r2, y)
        r1, r2 = r2, y
        old_beta, beta = torch.where(beta == 0, 1.0, beta), norm(y).to(torch.float64)
        old_epsilon = epsilon
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsilon = sn * beta
        dbar = -cs * beta
        gamma = torch.clamp(torch.hypot(gbar, beta), min=1e-300)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = {key: (v[key] - old_epsilon * w1[key] - delta * w2[key]) / gamma for key in v}
        x = {key: torch.where(live, x[key] + phi * w[key], x[key]) for key in x}
        finite = torch.isfinite(alfa) & torch.isfinite(beta)
        relative = torch.where(finite, phibar / beta1, torch.full_like(beta1, float("nan")))
        if checks.add(relative, beta):
            outcome = _minres_outcome(checks.read(), info, tol)
            if outcome is not None:
                return (_unknown(b) if outcome == "non_finite" else x), info.finish(outcome)
        live = _live(live, finite, relative > tol, beta != 0)
    return x, info.finish("out_of_iterations")


def _minres_outcome(rows: list[list[float]], info: SolveInfo, tol: float) -> str | None:
    """Walk the iterations since the last check in order; the first that ends the solve decides."""
    for relative, beta in rows:
        info.iterations += 1
        info.residuals.append(relative)
        verdict = _verdict(info.residuals, tol)
        if verdict is not None:
            return verdict
        if beta == 0.0:  # the Krylov space is exhausted: x is exact
            return "converged"
    return None


def largest_eigenvalue(matvec: MatVec, start: Params, iterations: int = 10) -> float:
    """``max |eig(A)|`` estimated by power iteration from ``start`` (no random draws: the RNG is the user's).

    The norms stay on the device until the end (one host read): a zero product stays zero after it.
    """
    u = scale(1.0 / norm(start), start)
    size = torch.zeros(())
    for _ in range(iterations):
        au = matvec(u)
        size = norm(au)
        u = scale(1.0 / torch.where(size == 0, 1.0, size), au)
    return float(size)


@dataclass
class CurvatureEstimate:
    """The largest eigenvalue ``L`` of one lower problem's Hessian, kept across its Neumann solves.

    Estimating it costs ten products, as much as a short series: doing it at every solve more than
    doubled the products of a 10-iteration solve. The estimate is kept and measured again every
    ``refresh`` solves, and at once when a series run with it diverges (the curvature grew past twice
    the estimate): that solve is then repeated with the new value, so a stale estimate costs products,
    never a wrong answer. A series that still diverges with a fresh estimate is reported ``diverged``.
    """

    value: float | None = None
    solves: int = 0  # solves since the last estimate
    refresh: int = 50

    def due(self) -> bool:
        return self.value is None or self.solves >= self.refresh

    def measure(self, matvec: MatVec, start: Params) -> float:
        self.value, self.solves = largest_eigenvalue(matvec, start), 0
        return self.value


@_counts_products
def neumann(
    matvec: MatVec,
    b: Params,
    *,
    iterations: int,
    tol: float,
    alpha: float | None,
    estimate: CurvatureEstimate | None = None,
    check_every: int = 1,
    indefinite: str = "minres",
) -> tuple[Params, SolveInfo]:
    """Solve ``A x = b`` by the Neumann series ``x = alpha * sum_j (I - alpha A)^j b``.

    Converges when the spectral radius of ``I - alpha A`` is below one (for a Hessian: ``alpha``
    below ``2 / L``). ``alpha=None`` uses ``1 / L``, safe while the estimate of ``L`` is within a
    factor two of the truth; ``L`` comes from ``estimate`` (kept across solves, see
    :class:`CurvatureEstimate`) or, without one, from ten power iterations now. The next series term
    equals the current residual, so the residual history costs no extra products; a history that
    grows is reported as ``diverged`` and the partial sum is not returned as an answer.

    Residuals are read every ``check_every`` iterations (see :func:`conjugate_gradient`); a converged
    sum stops growing on the device. A divergence is seen at the next check (the failed sum returned
    with it holds the terms up to that check).

    A series that diverges (after a stale estimate was measured again and the series repeated) cannot
    converge with this step: ``A`` is indefinite (far from a minimum) or ``alpha`` is above ``2 / L``.
    For symmetric ``A`` (a Hessian; the caller says so) ``indefinite="minres"`` then solves the same
    system again with MINRES on the remaining budget (at least half of ``iterations``; the solver is
    reported ``"neumann+minres"``); ``indefinite="fail"`` reports ``diverged`` with the failed sum.
    """
    if indefinite not in ("minres", "fail"):
        raise ValueError(f"indefinite={indefinite!r} is invalid: use 'minres' or 'fail'")
    kept = estimate if estimate is not None else CurvatureEstimate()
    settings = (iterations, tol, check_every)
    x, info = _neumann(matvec, b, settings, alpha, kept)
    if info.outcome == "diverged" and indefinite == "minres":
        return _restart_with_minres(matvec, b, settings, info)
    return x, info


def _neumann(
    matvec: MatVec, b: Params, settings: tuple[int, float, int], alpha: float | None, estimate: CurvatureEstimate
) -> tuple[Params, SolveInfo]:
    info = SolveInfo("neumann")
    b_norm = norm(b)
    if _bad_input(b_norm, info):
        return dict(b), info
    if float(b_norm) == 0.0:
        return zeros_like(b), info.finish("converged")
    if alpha is not None:
        return _series(matvec, b, b_norm, settings, alpha, info)
    fresh = estimate.due()
    largest = estimate.measure(matvec, b) if fresh else estimate.value
    estimate.solves += 1
    if not math.isfinite(largest):
        estimate.value = None
        info.residuals.append(float("nan"))
        return _unknown(b), info.finish("non_finite")
    x, info = _series(matvec, b, b_norm, settings, 1.0 / largest if largest > 0 else 1.0, info)
    info.estimated = fresh
    if info.outcome == "diverged" and not fresh:  # the kept estimate is stale: measure again and repeat
        estimate.value = None
        return _neumann(matvec, b, settings, None, estimate)
    return x, info


def _series(
    matvec: MatVec, b: Params, b_norm: Tensor, settings: tuple[int, float, int], alpha: float, info: SolveInfo
) -> tuple[Params, SolveInfo]:
    """The Neumann series with step ``alpha``, stopped by its residual history."""
    iterations, tol, check_every = settings
    info.alpha = alpha
    term = dict(b)
    total = dict(b)
    checks = _Checks(check_every, iterations)
    live = torch.ones((), dtype=torch.bool, device=b_norm.device)
    for _ in range(iterations):
        term = axpy(-alpha, matvec(term), term)
        relative = norm(term) / b_norm
        total = {k: torch.where(live, total[k] + term[k], total[k]) for k in total}
        if checks.add(relative):
            outcome = _neumann_outcome(checks.read(), info, tol)
            if outcome == "non_finite":
                return _unknown(b), info.finish(outcome)
            if outcome is not None:
                return scale(alpha, total), info.finish(outcome)
        live = _live(live, relative > tol)
    return scale(alpha, total), info.finish(_final(info.residuals))


def _neumann_outcome(rows: list[list[float]], info: SolveInfo, tol: float) -> str | None:
    """Walk the iterations since the last check in order; the first that ends the solve decides."""
    for (relative,) in rows:
        info.iterations += 1
        info.residuals.append(relative)
        verdict = _verdict(info.residuals, tol)
        if verdict is not None:
            return verdict
    return None


@_counts_products
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
    try:
        solution = torch.linalg.solve(matrix, flat_b)
    except torch.linalg.LinAlgError:  # e.g. a bias before BatchNorm: the minimum-norm answer, and say so
        solution = torch.linalg.pinv(matrix, hermitian=True) @ flat_b
        info.solver = "dense (singular: pseudo-inverse)"
    residual = torch.linalg.vector_norm(matrix @ solution - flat_b) / torch.linalg.vector_norm(flat_b)
    info.iterations = flat_b.numel()
    info.residuals.append(float(residual))
    info.finish("converged" if math.isfinite(float(residual)) else "non_finite")
    pieces = torch.split(solution, sizes)
    return {
        n: piece.reshape(s).to(b[n].dtype) for n, piece, s in zip(names, pieces, shapes, strict=False)
    }, info


def _same(params: Params) -> Params:
    return params


@dataclass(frozen=True)
class LinearSystem:
    """``A x = b`` with ``A`` given by products: ``matvec(u, create_graph)`` and its transpose ``rmatvec``.

    ``create_graph=True`` asks for a product that is itself differentiable (in ``u`` and in what
    ``A`` depends on); the solver's own iterations never ask for it. ``shared`` turns a cotangent that
    reaches the solve in a backward pass into the adjoint system's right-hand side: itself in one
    process; under data parallel, where ``A``'s products are sums over ranks and each rank's cotangent
    is its own part, their mean over ranks (every rank then solves the same system, and the parts it
    passes on still sum to the whole).
    """

    matvec: GraphMatVec
    rmatvec: GraphMatVec
    solver: Solver
    shared: Callable[[Params], Params] = _same

    def transposed(self) -> LinearSystem:
        return LinearSystem(self.rmatvec, self.matvec, self.solver, self.shared)

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
        g = ctx.system.shared({k: c for k, c in zip(ctx.keys, cotangents, strict=True)})
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
