"""A checker you can trust: an undamped exact reference, a true long unroll, no side effects."""

from __future__ import annotations

import logging
import math
import random

import numpy
import pytest
import torch
from torch import nn
from toy import bilevel

from betty_like import EngineConfig, ProblemConfig, check_hypergradient
from betty_like.testing import ridge
from betty_like.testing.closed_form import regression_data
from betty_like.testing.nested import diamond_two_lowers


def noisy_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 1))


def snapshot(engine) -> dict:
    state = {}
    for name, problem in engine.problems.items():
        for key, t in problem.module.state_dict().items():
            state[f"{name}.{key}"] = t.clone()
        optimizer = problem.optimizer.state_dict()
        for index, entry in optimizer["state"].items():
            for key, t in entry.items():
                state[f"{name}.opt.{index}.{key}"] = t.clone() if isinstance(t, torch.Tensor) else t
    state["rng.torch"] = torch.get_rng_state()
    state["rng.python"] = random.getstate()
    state["rng.numpy"] = numpy.random.get_state()[1].copy()
    return state


def assert_identical(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key
        elif isinstance(a, numpy.ndarray):
            assert numpy.array_equal(a, b), key
        else:
            assert a == b, key


def build():
    return bilevel(
        ProblemConfig(hypergrad="cg", iterations=5),
        engine_config=EngineConfig(train_iters=3),
        inner_module=noisy_net(),
        inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    )


def test_the_check_leaves_parameters_buffers_optimizer_state_and_rng_bit_identical():
    engine, _, _ = build()
    engine.run(2)
    before = snapshot(engine)
    check_hypergradient(engine)
    assert_identical(before, snapshot(engine))


def test_a_check_before_run_changes_nothing_the_run_does():
    checked, _, _ = build()
    torch.manual_seed(0)
    check_hypergradient(checked)  # draws no batch for good, moves no BatchNorm statistic
    checked.run()
    plain, _, _ = build()
    torch.manual_seed(0)
    plain.run()
    assert_identical(snapshot(plain), snapshot(checked))


def test_stochastic_layers_are_named_in_a_warning(caplog):
    engine, _, _ = build()
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        check_hypergradient(engine)
    (message,) = [r.getMessage() for r in caplog.records if "make the hypergradient random" in r.getMessage()]
    assert "inner.1 (BatchNorm1d)" in message and "inner.2 (Dropout)" in message and "eval mode" in message


def test_the_exact_reference_is_undamped_and_the_damping_bias_is_reported():
    case = ridge("cg", damping=1.0)
    case.engine.run()
    (report,) = check_hypergradient(case.engine, reference="exact")
    torch.testing.assert_close(report.reference_grad["penalty.value"], case.exact, rtol=1e-10, atol=0)
    assert report.relative_error > 0.05  # the damped answer is not blessed
    assert report.damping_bias == pytest.approx(report.relative_error, rel=1e-6)  # cg converged: all error is damping
    assert "damping alone moves the exact hypergradient" in str(report)


def ridge_contraction() -> float:
    """``1 - mu / L`` of the ridge lower problem's SGD at lr = 1 / L, from its Hessian written out."""
    x, _ = regression_data(40, 5, seed=0)
    eigenvalues = torch.linalg.eigvalsh(x.T @ x / len(x) + math.exp(-1.0) * torch.eye(5, dtype=torch.float64))
    return float(1.0 - eigenvalues.min() / eigenvalues.max())


@pytest.mark.parametrize("at_solution", [True, False])
def test_the_unroll_reference_is_a_long_unroll_of_the_users_optimizer(at_solution):
    # K steps of SGD at lr = 1/L contract the weights by rho per step and their derivative in lambda like
    # K rho^K; with K rho^K below 1e-12 and float64 rounding over K steps near 1e-13, rel. 1e-9 is a bound
    # the unroll must meet and that a wrong reference (an implicit one at the start, a truncated run) cannot
    steps, rho = 1000, ridge_contraction()
    assert steps * rho**steps < 1e-12
    case = ridge("cg", at_solution=at_solution)
    (report,) = check_hypergradient(case.engine, reference="unroll", unroll_steps=steps)
    error = abs(float(report.reference_grad["penalty.value"] - case.exact)) / abs(float(case.exact))
    assert error < 1e-9
    run = report.reference_info["inner"]
    assert report.reference == "unroll" and run.method == "unroll" and run.solve.iterations == steps
    assert run.solve.outcome == "converged"
    if not at_solution:  # at w = 0 the unroll trains to the solution; a reference evaluated at w = 0 does not
        (fixed,) = check_hypergradient(case.engine, reference="fixed_point")
        assert abs(float(fixed.reference_grad["penalty.value"] - case.exact)) / abs(float(case.exact)) > 1e-2


def test_a_short_unroll_says_it_had_not_converged(caplog):
    case = ridge("cg", at_solution=False)
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        (report,) = check_hypergradient(case.engine, reference="unroll", unroll_steps=3)
    assert report.reference_info["inner"].solve.outcome == "out_of_iterations"
    assert any("the unroll of 'inner' had not converged after 3 steps" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"unroll_steps=0 is invalid"):
        check_hypergradient(case.engine, reference="unroll", unroll_steps=0)


def test_method_none_checks_each_lower_with_its_own_method():
    case = diamond_two_lowers({"lower1": "cg", "lower2": "neumann"})
    (report,) = check_hypergradient(case.engine)
    assert report.info["lower1"].method == "cg" and report.info["lower2"].method == "neumann"
    assert report.method == "lower1: cg, lower2: neumann"
    assert report.relative_error < 1e-8
    exact = case.exact["upper"]["upper.value"] if "upper.value" in case.exact["upper"] else next(iter(case.exact["upper"].values()))
    torch.testing.assert_close(next(iter(report.reference_grad.values())), exact, rtol=1e-8, atol=1e-12)
