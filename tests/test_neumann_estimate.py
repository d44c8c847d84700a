"""Neumann's estimate of the largest Hessian eigenvalue is kept across solves, and a stale one is caught.

References are closed forms: ``torch.linalg.solve`` on the explicit matrix, and the ridge hypergradient.
"""

from __future__ import annotations

import torch

from betty_like.hypergrad import CurvatureEstimate, neumann_series
from betty_like.testing import ridge

ITERATIONS, TOL = 400, 1e-12


def system(scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    matrix = scale * torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    matrix[0, 1] = matrix[1, 0] = 0.3 * scale  # symmetric, positive definite, not diagonal
    b = {"w": torch.linspace(-1.0, 2.0, 5, dtype=torch.float64)}
    return matrix, b


def solve(matrix: torch.Tensor, b: dict, curvature: CurvatureEstimate | None):
    x, info = neumann_series(lambda u: {"w": matrix @ u["w"]}, b, iterations=ITERATIONS, tol=TOL, alpha=None, estimate=curvature)
    exact = torch.linalg.solve(matrix, b["w"])
    return float(torch.linalg.vector_norm(x["w"] - exact) / torch.linalg.vector_norm(exact)), info


def test_the_estimate_is_kept_across_solves_and_measured_again_when_due():
    matrix, b = system(1.0)
    curvature = CurvatureEstimate(refresh=3)
    first_error, first = solve(matrix, b, curvature)
    assert first.estimated and first.outcome == "converged" and first.products == 10 + first.iterations
    kept = [solve(matrix, b, curvature) for _ in range(2)]
    for error, info in kept:  # same alpha, no power iterations
        assert not info.estimated and info.alpha == first.alpha and info.products == info.iterations == first.iterations
        assert error < 1e-10
    _, refreshed = solve(matrix, b, curvature)  # the third solve since the estimate: measured again
    assert refreshed.estimated and refreshed.products == 10 + refreshed.iterations
    assert first_error < 1e-10


def test_a_stale_estimate_that_makes_the_series_diverge_is_measured_again_and_the_solve_repeated():
    curvature = CurvatureEstimate()
    solve(*system(1.0), curvature)  # L about 5.04
    stale = curvature.value
    error, info = solve(*system(4.0), curvature)  # L is now four times larger: alpha = 1 / 5 gives |1 - alpha L| = 3
    assert info.estimated and info.outcome == "converged" and error < 1e-10
    assert curvature.value > 3.5 * stale
    assert info.products > 10 + info.iterations  # the diverging attempt's products are counted too


def test_without_a_kept_estimate_every_solve_measures():
    matrix, b = system(1.0)
    infos = [solve(matrix, b, None)[1] for _ in range(2)]
    assert all(i.estimated and i.products == 10 + i.iterations for i in infos)


def test_the_engine_estimates_once_and_the_hypergradient_stays_exact():
    case = ridge("neumann", iterations=200)
    products, estimated = [], []
    for _ in range(4):
        case.engine.run(1)
        solve_info = case.engine.status(case.upper).diagnostics[case.lower].solve
        products.append(solve_info.products)
        estimated.append(solve_info.estimated)
        gradient = case.engine.status(case.upper).gradient[f"{case.upper}.value"]
        assert abs(float(gradient - case.exact)) / abs(float(case.exact)) < 1e-8  # closed form (torch.linalg.solve)
    k = products[-1]
    assert estimated == [True, False, False, False] and products == [k + 10, k, k, k]
