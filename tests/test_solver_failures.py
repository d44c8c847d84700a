"""Every solve reports its outcome, and a failed one never becomes a silent wrong hypergradient.

The failures are made certain by closed forms: ridge regression whose Hessian is known (a Neumann step
of 2.05 / L diverges), a quadratic saddle (conjugate gradient meets negative curvature on its first
direction), and a five-dimensional system that two Krylov iterations cannot solve.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from toy import Outer, bilevel

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.hypergrad import CurvatureEstimate, conjugate_gradient, minres, neumann_series
from betty_like.hypergrad.fixed_point import symmetric_update
from betty_like.optim import FunctionalOptimizer
from betty_like.testing import ridge
from betty_like.testing.closed_form import regression_data


def ridge_hessian() -> tuple[torch.Tensor, float]:
    """The ridge lower problem's Hessian, rebuilt from its data (``betty_like.testing.ridge``), and its largest eigenvalue."""
    x, _ = regression_data(40, 5, seed=0)
    hessian = x.T @ x / 40 + math.exp(-1.0) * torch.eye(5, dtype=torch.float64)
    return hessian, float(torch.linalg.eigvalsh(hessian).max())


# --------------------------------------------------------------------------- divergence
def test_divergent_neumann_raises_naming_lower_method_residuals_and_fix():
    _, lipschitz = ridge_hessian()
    case = ridge("neumann", alpha=2.05 / lipschitz, indefinite="fail")  # the default continues with MINRES
    with pytest.raises(FloatingPointError) as error:
        case.engine.run()
    message = str(error.value)
    assert "problem 'penalty'" in message and "lower problem 'inner'" in message
    assert "neumann diverged" in message and "relative residuals [" in message
    assert "alpha=...) below 2 / L" in message and "on_solver_failure='warn'" in message
    assert case.engine.status("penalty").steps == 0  # nothing committed


def test_divergence_is_caught_from_the_trend_long_before_a_blow_up():
    hessian, lipschitz = ridge_hessian()
    b = {"w": torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)}
    matvec = lambda u: {"w": hessian @ u["w"]}  # noqa: E731
    _, info = neumann_series(matvec, b, iterations=1000, tol=1e-12, alpha=2.05 / lipschitz, indefinite="fail")
    assert info.outcome == "diverged" and info.failed
    assert info.iterations < 200 and info.residual < 1e3  # |1 - 2.05| = 1.05 per step: the trend, not 1e12
    assert all(later > earlier for earlier, later in zip(info.residuals[-5:], info.residuals[-4:], strict=False))


def test_divergent_fixed_point_raises_with_its_own_fix():
    _, lipschitz = ridge_hessian()
    case = ridge("fixed_point", lr=2.05 / lipschitz, indefinite="fail")
    with pytest.raises(FloatingPointError, match=r"fixed_point solve through lower problem 'inner' failed.*lower its learning rate"):
        case.engine.run()


def test_warn_logs_every_step_with_the_step_and_ignore_is_silent(caplog):
    _, lipschitz = ridge_hessian()
    case = ridge("neumann", alpha=2.05 / lipschitz, on_solver_failure="warn", indefinite="fail")
    case.engine.config.train_iters = 3
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        case.engine.run()
    lines = [r.getMessage() for r in caplog.records if "diverged" in r.getMessage()]
    assert [("at its step 1" in m, "at its step 2" in m, "at its step 3" in m) for m in lines] == [
        (True, False, False), (False, True, False), (False, False, True)
    ]
    assert case.engine.status("penalty").diagnostics["inner"].solve.outcome == "diverged"

    caplog.clear()
    quiet = ridge("neumann", alpha=2.05 / lipschitz, on_solver_failure="ignore", indefinite="fail")
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        quiet.engine.run()
    assert not caplog.records
    assert quiet.engine.status("penalty").diagnostics["inner"].solve.outcome == "diverged"


def test_default_alpha_is_estimated_from_the_curvature_and_is_safe():
    _, lipschitz = ridge_hessian()
    case = ridge("neumann", lr=1.9 / lipschitz)  # the old default (alpha = lr) was within 5 % of diverging
    case.engine.run()
    info = case.engine.status("penalty").diagnostics["inner"].solve
    assert info.outcome == "converged"
    assert info.alpha == pytest.approx(1.0 / lipschitz, rel=0.05)
    torch.testing.assert_close(case.engine.status("penalty").gradient["penalty.value"], case.exact, rtol=1e-8, atol=0)


# --------------------------------------------------------------------------- the saddle
A = torch.tensor([2.0, -1.0], dtype=torch.float64)  # the lower Hessian: diag(2, -1), a saddle
B = torch.tensor([1.0, 1.0], dtype=torch.float64)
V = torch.tensor([0.1, 1.0], dtype=torch.float64)  # v^T A v = 0.02 - 1 < 0: CG's first direction has negative curvature


class Point(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(value.clone())

    def forward(self) -> torch.Tensor:
        return self.w


class SaddleLower(Problem):
    def training_step(self, batch):
        w = self.module()
        return 0.5 * (A * w * w).sum() - self.upper() * (B * w).sum()


class SaddleUpper(Problem):
    def training_step(self, batch):
        return 0.5 * ((self.lower() - self.target) ** 2).sum()


def saddle(method: str, **config) -> tuple[Engine, float]:
    """Lower: stationary point w* = lam A^-1 b of a saddle; upper: 0.5 ||w* - t||^2 with w* - t = V.

    The exact hypergradient is ``(w* - t)^T A^-1 b = V^T A^-1 b = 0.05 - 1 = -0.95``.
    """
    lam = torch.tensor(1.0, dtype=torch.float64)
    w_star = lam * B / A
    lower_module, upper_module = Point(w_star), Point(lam)
    lower = SaddleLower(
        "lower", module=lower_module, optimizer=torch.optim.SGD(lower_module.parameters(), lr=0.0),
        data=[0], config=ProblemConfig(hypergrad=method, **config),
    )
    upper = SaddleUpper("upper", module=upper_module, optimizer=torch.optim.SGD(upper_module.parameters(), lr=0.0), data=[0])
    upper.target = w_star - V
    engine = Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, EngineConfig(train_iters=1))
    return engine, float(V @ (B / A))


def test_cg_on_a_saddle_continues_with_minres_and_is_exact():
    engine, exact = saddle("cg")
    engine.run()
    info = engine.status("upper").diagnostics["lower"].solve
    assert info.negative_curvature and info.solver == "cg+minres" and info.outcome == "converged"
    assert exact == pytest.approx(-0.95)
    assert float(engine.status("upper").gradient["upper.w"]) == pytest.approx(exact, rel=1e-12)


def test_cg_never_hands_on_its_truncated_iterate():
    hessian = torch.diag(A)
    _, info = conjugate_gradient(lambda u: {"w": hessian @ u["w"]}, {"w": V}, iterations=10, tol=1e-12, indefinite="fail")
    assert info.outcome == "negative_curvature" and info.failed


def test_neumann_on_a_saddle_fails_instead_of_answering_when_told_to():
    engine, _ = saddle("neumann", indefinite="fail")
    with pytest.raises(FloatingPointError, match=r"lower problem 'lower' failed: neumann diverged.*cg handles that"):
        engine.run()


# --------------------------------------------------------------------------- a diverging series continues with MINRES
ROTATION, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
SPECTRUM = torch.tensor([3.0, 2.0, 1.0, 0.5, -0.7, -1.5], dtype=torch.float64)
INDEFINITE = ROTATION @ torch.diag(SPECTRUM) @ ROTATION.T  # symmetric, two negative eigenvalues, not diagonal
LOAD = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)
OFFSET = torch.linspace(0.5, -0.5, 6, dtype=torch.float64)


class IndefiniteLower(Problem):
    def training_step(self, batch):
        w = self.module()
        return 0.5 * w @ INDEFINITE @ w - self.upper() * (LOAD @ w)


def indefinite_case(method: str, optimizer=None, **config) -> tuple[Engine, float]:
    """Lower: the stationary point ``w* = lam A^-1 b`` of ``0.5 w^T A w - lam b^T w`` (``A`` indefinite);
    upper: ``0.5 ||w* - t||^2`` with ``w* - t = c``. Exact hypergradient: ``c^T A^-1 b``, by ``torch.linalg.solve``."""
    lam = torch.tensor(1.0, dtype=torch.float64)
    w_star = lam * torch.linalg.solve(INDEFINITE, LOAD)
    lower_module, upper_module = Point(w_star), Point(lam)
    optimizer = optimizer or (lambda params: torch.optim.SGD(params, lr=0.5))
    lower = IndefiniteLower(
        "lower", module=lower_module, optimizer=optimizer(lower_module.parameters()), data=[0],
        config=ProblemConfig(hypergrad=method, **config),
    )
    upper = SaddleUpper("upper", module=upper_module, optimizer=torch.optim.SGD(upper_module.parameters(), lr=0.0), data=[0])
    upper.target = w_star - OFFSET
    engine = Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, EngineConfig(train_iters=1))
    return engine, float(OFFSET @ torch.linalg.solve(INDEFINITE, LOAD))


@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
def test_a_diverging_series_continues_with_minres_exactly_and_says_so(method, caplog):
    """The default neumann and fixed_point (SGD) on an indefinite Hessian: exact answer, ``+minres``, one log line."""
    engine, exact = indefinite_case(method)
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        engine.run()
    info = engine.status("upper").diagnostics["lower"].solve
    assert info.solver == f"{method}+minres" and info.outcome == "converged" and not info.failed, info.describe()
    assert not info.negative_curvature  # a divergence is no proof of indefiniteness (a step above 2 / L diverges too)
    error = abs(float(engine.status("upper").gradient["upper.w"]) - exact) / abs(exact)
    print(f"{method}: relative error {error:.2e} against torch.linalg.solve ({info.describe()})")
    assert error < 1e-8
    logged = [r.getMessage() for r in caplog.records if "continued with MINRES" in r.getMessage()]
    assert len(logged) == 1 and f"its {method} iteration diverged" in logged[0] and "indefinite='fail'" in logged[0]


@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
def test_indefinite_fail_still_raises_on_a_diverging_series(method):
    engine, _ = indefinite_case(method, indefinite="fail")
    with pytest.raises(FloatingPointError, match=rf"{method} solve through lower problem 'lower' failed: {method} diverged") as error:
        engine.run()
    assert type(error.value).__name__ == "SolverFailure"


def test_the_minres_restart_comes_after_the_estimate_is_measured_again_and_the_series_repeated():
    """A stale estimate is measured again first (a series that then converges needs no MINRES); a series
    that still diverges with the fresh estimate restarts with MINRES."""
    ridge_matrix, _ = ridge_hessian()
    curvature = CurvatureEstimate()
    b = {"w": LOAD[:5].clone()}
    neumann_series(lambda u: {"w": ridge_matrix @ u["w"]}, b, iterations=400, tol=1e-12, alpha=None, estimate=curvature)
    _, repeated = neumann_series(
        lambda u: {"w": 4.0 * ridge_matrix @ u["w"]}, b, iterations=400, tol=1e-12, alpha=None, estimate=curvature
    )
    assert repeated.solver == "neumann" and repeated.estimated and repeated.outcome == "converged"
    stale = CurvatureEstimate(value=1.0)  # kept from an earlier solve
    x, info = neumann_series(
        lambda u: {"w": INDEFINITE @ u["w"]}, {"w": LOAD.clone()}, iterations=100, tol=1e-12, alpha=None, estimate=stale
    )
    assert info.solver == "neumann+minres" and info.outcome == "converged"
    assert info.estimated and stale.value == pytest.approx(3.0, rel=1e-2)  # measured again before the restart
    assert info.products > 10 + info.iterations  # the stale attempt, the power iterations, the repeat and MINRES
    exact = torch.linalg.solve(INDEFINITE, LOAD)
    assert float(torch.linalg.vector_norm(x["w"] - exact) / torch.linalg.vector_norm(exact)) < 1e-10


def test_fixed_point_restarts_only_where_its_system_is_symmetric():
    """SGD (any momentum, one step scale) gives ``c (H + wd)``: symmetric. Adam's ``D H`` and two learning rates are not."""
    def sym(optimizer_cls, **kwargs) -> bool:
        net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        groups = kwargs.pop("groups", None) or [{"params": list(net.parameters())}]
        optimizer = optimizer_cls(groups, **kwargs)
        names = {id(p): n for n, p in net.named_parameters()}
        return symmetric_update(FunctionalOptimizer.from_optimizer(optimizer, names, "lower"))

    assert sym(torch.optim.SGD, lr=0.1) and sym(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    net_groups = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    assert not sym(torch.optim.Adam, lr=0.1)
    two_rates = [{"params": net_groups[0].parameters(), "lr": 0.1}, {"params": net_groups[1].parameters(), "lr": 0.2}]
    optimizer = torch.optim.SGD(two_rates, lr=0.1)
    names = {id(p): n for n, p in net_groups.named_parameters()}
    assert not symmetric_update(FunctionalOptimizer.from_optimizer(optimizer, names, "lower"))
    engine, _ = indefinite_case("fixed_point", optimizer=lambda params: torch.optim.Adam(params, lr=0.5))
    with pytest.raises(FloatingPointError, match=r"fixed_point solve through lower problem 'lower' failed"):
        engine.run()


def test_minres_solves_symmetric_indefinite_systems():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    matrix = q @ torch.diag(torch.linspace(-3.0, 5.0, 12, dtype=torch.float64) + 0.05) @ q.T
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x, info = minres(lambda u: {"x": matrix @ u["x"]}, {"x": b}, iterations=50, tol=1e-12)
    assert info.outcome == "converged"
    torch.testing.assert_close(x["x"], torch.linalg.solve(matrix, b), rtol=1e-9, atol=1e-10)
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(info.residuals, info.residuals[1:], strict=False))


# --------------------------------------------------------------------------- the budget
def test_a_small_iteration_budget_is_reported_and_logged_but_no_error(caplog):
    hessian, _ = ridge_hessian()
    case = ridge("cg", iterations=2)
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        case.engine.run()
    info = case.engine.status("penalty").diagnostics["inner"].solve
    assert info.outcome == "out_of_iterations" and not info.failed and info.iterations == 2
    # independent reference: CG's k-th iterate minimises the H-norm error over span{b, Hb}
    xv, yv = regression_data(30, 5, seed=1)
    w_star = case.engine.problems["inner"].module.weight.detach().reshape(-1)
    b = xv.T @ (xv @ w_star - yv) / 30
    krylov = torch.stack([b, hessian @ b], dim=1)
    x2 = krylov @ torch.linalg.solve(krylov.T @ hessian @ krylov, krylov.T @ b)
    expected = float(torch.linalg.vector_norm(b - hessian @ x2) / torch.linalg.vector_norm(b))
    assert info.residual == pytest.approx(expected, rel=1e-8)
    assert expected > 1e-2
    logged = [r.getMessage() for r in caplog.records if "used all its iterations" in r.getMessage()]
    assert len(logged) == 1 and "'inner'" in logged[0] and "iterations=..." in logged[0]


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tol": math.inf}, r"tol=inf is invalid: use a finite positive number"),
        ({"damping": math.inf}, r"damping=inf is invalid: use a finite number >= 0"),
        ({"fd_epsilon": math.inf}, r"fd_epsilon=inf is invalid"),
        ({"alpha": math.nan}, r"alpha=nan is invalid"),
        ({"alpha": "0.1"}, r"alpha='0.1' is invalid: use a finite positive number"),
        ({"damping": "0.1"}, r"damping='0.1' is invalid"),
        ({"grad_clip": math.inf}, r"grad_clip=inf is invalid"),
        ({"on_solver_failure": "sometimes"}, r"on_solver_failure='sometimes'.*\['raise', 'warn', 'ignore'\]"),
        ({"indefinite": "ignore"}, r"indefinite='ignore' is invalid: choose one of \['minres', 'fail'\]"),
    ],
)
def test_non_finite_and_mistyped_config_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProblemConfig(**kwargs)


def test_string_seed_is_rejected():
    with pytest.raises(ValueError, match=r"EngineConfig.seed='1' is invalid: use an integer >= 0 or None"):
        EngineConfig(seed="1")


# --------------------------------------------------------------------------- non-finite hypergradients
class PitfallOuter(Outer):
    """A finite loss with a NaN gradient: ``torch.where`` differentiates the branch it does not take."""

    def training_step(self, batch):
        x, y = batch
        s = (self.inner(x).squeeze(-1) - y) ** 2
        return torch.where(s > 2, torch.sqrt(s - 1), torch.zeros_like(s)).mean() + s.mean()


@pytest.mark.parametrize("method", ["unroll", "cg"])
def test_a_nan_hypergradient_never_reaches_the_optimizer_and_names_the_upper(method):
    engine, _, outer = bilevel(ProblemConfig(hypergrad=method), outer_cls=PitfallOuter)
    before = outer.module.scale.detach().clone()
    with pytest.raises(FloatingPointError) as error:
        engine.run()
    message = str(error.value)
    assert "problem 'outer' at its step 1" in message and "['outer.scale']" in message
    assert "on_nonfinite='skip'" in message
    if method == "cg":
        assert "its own gradient" in message and "mask the input of sqrt" in message
    assert torch.equal(outer.module.scale.detach(), before)


def test_skip_skips_the_upper_step_not_the_lower():
    engine, inner, outer = bilevel(
        ProblemConfig(hypergrad="cg"), ProblemConfig(on_nonfinite="skip"), EngineConfig(train_iters=6), outer_cls=PitfallOuter
    )
    engine.run()
    assert engine.status("inner").steps == 6 and engine.status("inner").skipped == 0
    assert engine.status("outer").steps == 0 and engine.status("outer").skipped == 6
    assert float(outer.module.scale.detach()) == 1.0
    assert all(torch.isfinite(p).all() for p in inner.module.parameters())


class HalfAbsSquare(torch.autograd.Function):
    """``0.5 w |w|`` with the hand-written derivative ``sqrt(w * w)``: finite value and gradient, NaN Hessian at 0."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return 0.5 * w * w.abs()

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * torch.sqrt(w * w)


class KinkedLower(Problem):
    def training_step(self, batch):
        w = self.module()
        return 0.5 * ((w - self.upper()) ** 2).sum() + HalfAbsSquare.apply(w).sum()


def kinked(**config) -> Engine:
    lower_module, upper_module = Point(torch.zeros(2, dtype=torch.float64)), Point(torch.zeros((), dtype=torch.float64))
    lower = KinkedLower(
        "lower", module=lower_module, optimizer=torch.optim.SGD(lower_module.parameters(), lr=0.0), data=[0],
        config=ProblemConfig(hypergrad="cg", **config),
    )
    upper = SaddleUpper("upper", module=upper_module, optimizer=torch.optim.SGD(upper_module.parameters(), lr=0.0), data=[0])
    upper.target = torch.ones(2, dtype=torch.float64)
    return Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, EngineConfig(train_iters=1))


def test_a_nan_hessian_vector_product_is_a_solver_failure_of_the_lower():
    with pytest.raises(FloatingPointError, match=r"through lower problem 'lower' failed: cg non_finite.*Hessian-vector product of 'lower'"):
        kinked().run()


def test_a_nan_hessian_vector_product_ignored_still_stops_at_the_upper():
    engine = kinked(on_solver_failure="ignore")
    with pytest.raises(FloatingPointError, match=r"problem 'upper' at its step 1.*Hessian-vector product in the solve through \['lower'\]"):
        engine.run()
    assert float(engine.problems["upper"].module.w.detach()) == 0.0
