"""A checker you can trust: an undamped exact reference, a renamed long reference, no side effects."""

from __future__ import annotations

import logging
import random

import numpy
import pytest
import torch
from torch import nn
from toy import bilevel

from betty_like import EngineConfig, ProblemConfig, check_hypergradient
from betty_like.testing import ridge
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


def test_the_long_reference_is_named_for_what_it_is():
    case = ridge("cg")
    case.engine.run()
    (new,) = check_hypergradient(case.engine, reference="fixed_point")
    with pytest.warns(FutureWarning, match=r"reference='unroll'.*use reference='fixed_point'"):
        (old,) = check_hypergradient(case.engine, reference="unroll")
    assert old.reference == "fixed_point" and torch.equal(old.reference_grad["penalty.value"], new.reference_grad["penalty.value"])


def test_method_none_checks_each_lower_with_its_own_method():
    case = diamond_two_lowers({"lower1": "cg", "lower2": "neumann"})
    (report,) = check_hypergradient(case.engine)
    assert report.info["lower1"].method == "cg" and report.info["lower2"].method == "neumann"
    assert report.method == "lower1: cg, lower2: neumann"
    assert report.relative_error < 1e-8
    exact = case.exact["upper"]["upper.value"] if "upper.value" in case.exact["upper"] else next(iter(case.exact["upper"].values()))
    torch.testing.assert_close(next(iter(report.reference_grad.values())), exact, rtol=1e-8, atol=1e-12)
