"""Every hypergradient method against closed-form float64 references (torch.linalg.solve)."""

import pytest
import torch

from betty_like import check_hypergradient
from betty_like.testing.closed_form import chain, ridge, sample_weights

PROBLEMS = {"ridge": ridge, "sample_weights": sample_weights, "chain": chain}
IMPLICIT = ["neumann", "cg", "fixed_point"]


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got - exact).norm() / exact.norm())


def cosine(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(got.flatten(), exact.flatten(), dim=0))


def engine_hypergradient(case) -> torch.Tensor:
    case.engine.run()
    return case.engine.status(case.upper).gradient[f"{case.upper}.value"]


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("method", IMPLICIT)
def test_implicit_methods_are_exact_with_defaults(problem, method):
    case = PROBLEMS[problem](method)
    assert relative_error(engine_hypergradient(case), case.exact) < 1e-6


@pytest.mark.parametrize("problem", PROBLEMS)
def test_unroll_converges_to_the_implicit_hypergradient(problem):
    short = PROBLEMS[problem]("unroll", unroll_steps=1)
    long = PROBLEMS[problem]("unroll", unroll_steps=200)
    # one step is a poor estimate; many steps from the solution reach the implicit answer
    assert relative_error(engine_hypergradient(short), short.exact) > 1e-2
    assert relative_error(engine_hypergradient(long), long.exact) < 1e-6


@pytest.mark.parametrize("problem", PROBLEMS)
def test_truncated_unroll_keeps_only_the_last_steps(problem):
    full = PROBLEMS[problem]("unroll", unroll_steps=3)
    truncated = PROBLEMS[problem]("unroll", unroll_steps=3, truncate=1)
    one_step = PROBLEMS[problem]("unroll", unroll_steps=1)
    g_trunc = engine_hypergradient(truncated)
    assert torch.allclose(g_trunc, engine_hypergradient(one_step), rtol=1e-10, atol=1e-14)
    assert not torch.allclose(g_trunc, engine_hypergradient(full), rtol=1e-6)


@pytest.mark.parametrize("problem", ["sample_weights", "chain"])
@pytest.mark.parametrize("method", ["darts", "first_order"])
def test_first_order_approximations_point_the_right_way(problem, method):
    case = PROBLEMS[problem](method)
    got = engine_hypergradient(case)
    assert cosine(got, case.exact) > 0.5
    assert relative_error(got, case.exact) > 1e-3  # biased by design: it is an approximation


def test_darts_equals_first_order_up_to_finite_difference_error():
    # both estimate -lr * d/dlam <grad_w f, v>: darts by central differences, first_order exactly
    darts = engine_hypergradient(sample_weights("darts"))
    first = engine_hypergradient(sample_weights("first_order"))
    assert relative_error(darts, first) < 1e-6


def test_sama_points_the_right_way_under_adam():
    case = sample_weights("cg", optimizer="adam", at_solution=False, unroll_steps=20)
    case.engine.run()
    (report,) = check_hypergradient(case.engine, method="sama")
    assert report.cosine > 0.5
    assert report.relative_error > 1e-3


def test_sama_under_sgd_is_darts_with_the_learning_rate():
    # SGD's update responds to its gradient through lr * I: SAMA's adaptation reduces to DARTS' scale
    sama = engine_hypergradient(sample_weights("sama"))
    darts = engine_hypergradient(sample_weights("darts"))
    first = engine_hypergradient(sample_weights("first_order"))
    assert relative_error(sama, darts) < 1e-12
    assert relative_error(sama, first) < 1e-6


def test_sama_refuses_optimizers_without_a_known_adaptation():
    with pytest.raises(TypeError, match=r"problem 'inner' uses hypergrad='sama'.*'SGD', 'Adam', 'AdamW'.*RMSprop"):
        sample_weights("sama", optimizer="rmsprop")


@pytest.mark.parametrize("method", IMPLICIT + ["darts"])
def test_methods_agree_with_the_checker_reference(method):
    case = chain("cg")
    case.engine.run()
    (report,) = check_hypergradient(case.engine, method=method, reference="exact")
    tolerance = 1e-6 if method in IMPLICIT else 1.0
    assert report.relative_error < tolerance
    assert report.cosine > 0.5


def test_checker_exact_and_unroll_references_agree_at_a_solution():
    case = ridge("cg")
    case.engine.run()
    (exact,) = check_hypergradient(case.engine, method="cg", reference="exact")
    (unroll,) = check_hypergradient(case.engine, method="cg", reference="fixed_point")
    assert exact.relative_error < 1e-10 and unroll.relative_error < 1e-10
    assert exact.info["inner"].solve.residuals[-1] < 1e-12
    assert "relative error" in str(exact)


def test_checker_matches_the_closed_form_answer():
    case = sample_weights("neumann")
    case.engine.run()
    (report,) = check_hypergradient(case.engine, reference="exact")
    assert relative_error(report.reference_grad["weights.value"], case.exact) < 1e-10


def test_cg_is_not_fooled_by_a_few_iterations():
    few = sample_weights("cg", iterations=1)
    many = sample_weights("cg")
    err_few = relative_error(engine_hypergradient(few), few.exact)
    err_many = relative_error(engine_hypergradient(many), many.exact)
    assert err_many < 1e-10 < 1e-3 < err_few
    assert few.engine.status("weights").diagnostics["inner"].solve.iterations == 1


@pytest.mark.parametrize(
    ("pretrain", "finetune"), [("cg", "unroll"), ("unroll", "cg"), ("neumann", "fixed_point")]
)
def test_levels_may_mix_methods(pretrain, finetune):
    # gradients cross from an unrolled graph into an implicit push and back, level by level
    steps = 200 if "unroll" in (pretrain, finetune) else 1
    case = chain(finetune, pretrain_method=pretrain, unroll_steps=steps)
    assert relative_error(engine_hypergradient(case), case.exact) < 1e-6
