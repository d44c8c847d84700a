"""Solvers read their residuals on the host only at check points (``solver_check_every``).

A host read of a device scalar (``float(t)``, ``t.item()``, ``bool(t)``, ``t.tolist()``) waits for the
device; on a GPU one per iteration stalls every product. Here the reads are counted on the CPU by
wrapping those tensor methods: with sparse checks a solve must read a fixed number of times however
many iterations it runs, with checks at every iteration it reads once per iteration (which shows the
count can fail). The answers, histories and outcomes must be those of a check at every iteration,
and the failure checks of the solvers (negative curvature, divergence, NaN) must still fire.
References: ``torch.linalg.solve`` in float64.
"""

from __future__ import annotations

import pytest
import torch

from betty_like import ProblemConfig
from betty_like.hypergrad import conjugate_gradient, minres, neumann_series
from betty_like.testing.closed_form import ridge

N = 30


def system(eigenvalues: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    matrix = q @ torch.diag(eigenvalues.to(torch.float64)) @ q.T
    b = torch.randn(len(eigenvalues), generator=g, dtype=torch.float64)
    return (lambda u: {"x": matrix @ u["x"]}), {"x": b}, matrix


SPD = torch.linspace(0.5, 2.0, N)
SOLVERS = {
    "cg": lambda mv, b, **kw: conjugate_gradient(mv, b, **kw),
    "minres": lambda mv, b, **kw: minres(mv, b, **kw),
    "neumann": lambda mv, b, **kw: neumann_series(mv, b, alpha=0.6, **kw),
}


@pytest.fixture
def host_reads(monkeypatch):
    """Counts host reads of tensors (each is a device synchronisation on a GPU)."""
    count = [0]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize(("tol", "iterations"), [(1e-10, 80), (0.0, 12)])  # converging between checks; out of iterations
def test_sparse_checks_give_the_same_answer_and_history(solver, tol, iterations):
    matvec, b, matrix = system(SPD)
    every, sparse = (SOLVERS[solver](matvec, b, iterations=iterations, tol=tol, check_every=k) for k in (1, 7))
    assert torch.equal(every[0]["x"], sparse[0]["x"])
    assert every[1].residuals == sparse[1].residuals and every[1].outcome == sparse[1].outcome
    assert every[1].iterations == sparse[1].iterations
    exact = torch.linalg.solve(matrix, b["x"])
    error = float((sparse[0]["x"] - exact).norm() / exact.norm())
    assert error < (1e-8 if tol else 0.1), error


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_with_sparse_checks_the_host_reads_do_not_grow_with_the_iterations(solver, host_reads):
    matvec, b, _ = system(SPD)
    counts = {}
    for iterations in (10, 40):
        host_reads[0] = 0
        _, info = SOLVERS[solver](matvec, b, iterations=iterations, tol=0.0, check_every=1000)
        counts[iterations] = host_reads[0]
        assert info.iterations == iterations and len(info.residuals) == iterations
    assert counts[10] == counts[40] <= 3, counts
    host_reads[0] = 0
    SOLVERS[solver](matvec, b, iterations=40, tol=0.0, check_every=1)
    assert host_reads[0] >= 40  # a check at every iteration reads every iteration


def test_negative_curvature_is_still_found_and_minres_continues():
    eigenvalues = torch.linspace(-1.0, 2.0, N)
    matvec, b, matrix = system(eigenvalues + 0.05)
    x, info = conjugate_gradient(matvec, b, iterations=200, tol=1e-10, check_every=16)
    assert info.negative_curvature and info.solver == "cg+minres" and info.outcome == "converged"
    exact = torch.linalg.solve(matrix, b["x"])
    assert float((x["x"] - exact).norm() / exact.norm()) < 1e-8
    _, failed = conjugate_gradient(matvec, b, iterations=200, tol=1e-10, check_every=16, indefinite="fail")
    assert failed.outcome == "negative_curvature"


def test_divergence_and_nan_are_still_found():
    matvec, b, _ = system(SPD)
    _, info = neumann_series(matvec, b, iterations=200, tol=1e-10, alpha=1.5, check_every=16, indefinite="fail")  # |1 - 3| > 1
    assert info.outcome == "diverged"
    calls = [0]

    def poisoned(u):
        calls[0] += 1
        out = matvec(u)
        return {"x": out["x"] * float("nan")} if calls[0] == 5 else out

    for solver in SOLVERS:
        calls[0] = 0
        x, info = SOLVERS[solver](poisoned, b, iterations=50, tol=1e-12, check_every=16)
        assert info.outcome == "non_finite" and torch.isnan(x["x"]).all(), (solver, info.describe())


def test_the_config_knob_reaches_the_solver_and_keeps_the_hypergradient():
    gradients = {}
    for every in (1, 6):
        case = ridge("cg", solver_check_every=every)
        case.engine.run()
        gradients[every] = case.engine.status(case.upper).gradient
        info = case.engine.status(case.upper).diagnostics[case.lower].solve
        assert info.outcome == "converged"
    assert all(torch.equal(gradients[1][k], gradients[6][k]) for k in gradients[1])
    assert ProblemConfig().solver_check_every is None
