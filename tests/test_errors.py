"""Every user mistake gets an exception that names the problem, the value and the fix."""

import pytest
import torch
from torch import nn
from toy import Inner, Outer, Scale, batches, bilevel

from betty_like import Engine, EngineConfig, ProblemConfig


def _problems():
    net, scale = nn.Linear(3, 1), Scale()
    inner = Inner("inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=batches())
    outer = Outer(
        "outer", module=scale, optimizer=torch.optim.SGD(scale.parameters(), lr=0.1), data=batches()
    )
    return inner, outer


# --------------------------------------------------------------------------- graph
def test_cycle_names_the_problems():
    inner, outer = _problems()
    with pytest.raises(ValueError, match=r"u2l edges form a cycle among problems \['outer', 'inner'\]"):
        Engine([outer, inner], {"u2l": {outer: [inner], inner: [outer]}, "l2u": {inner: [outer]}})


def test_unknown_problem_in_edges():
    inner, outer = _problems()
    with pytest.raises(ValueError, match=r"unknown problem 'ghost'.*\['inner', 'outer'\]"):
        Engine([outer, inner], {"u2l": {outer: ["ghost"]}})


def test_duplicate_names():
    inner, _ = _problems()
    net = nn.Linear(3, 1)
    twin = Inner("inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=batches())
    with pytest.raises(ValueError, match=r"unique.*\['inner'\]"):
        Engine([inner, twin])


class PlainInner(Inner):
    def training_step(self, batch):
        x, y = batch
        return ((self.module(x).squeeze(-1) - y) ** 2).mean()


def test_l2u_edge_alone_means_the_reader_responds_to_the_lower():
    # Betty's meaning: outer's loss reads inner's solution, which does not depend on outer's parameters,
    # so outer's solution responds to inner's (an input) and outer takes its plain gradient after inner reports
    _, outer = _problems()
    net = nn.Linear(3, 1)
    inner = PlainInner("inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=batches())
    engine = Engine([outer, inner], {"l2u": {inner: [outer]}}, EngineConfig(train_iters=2))
    assert engine.graph.lowers("outer") == [] and engine.graph.inputs("outer") == ["inner"]
    engine.run()
    assert engine.status("outer").steps == 2 and engine.status("outer").diagnostics == {}


def test_u2l_edge_without_l2u_partner():
    inner, outer = _problems()
    with pytest.raises(
        ValueError, match=r"u2l edge 'outer' -> 'inner' carries no gradient.*'l2u': \{'inner': \['outer'\]\}"
    ):
        Engine([outer, inner], {"u2l": {outer: [inner]}})


def test_self_edge_and_unknown_dependency_key():
    inner, outer = _problems()
    with pytest.raises(ValueError, match="points a problem at itself"):
        Engine([outer, inner], {"u2l": {outer: [outer]}})
    with pytest.raises(ValueError, match=r"unknown keys \['upper'\]"):
        Engine([outer, inner], {"upper": {}})


# --------------------------------------------------------------------------- training_step output
class FloatInner(Inner):
    def training_step(self, batch):
        return 1.0


class VectorInner(Inner):
    def training_step(self, batch):
        x, y = batch
        return (self.module(x).squeeze(-1) - y) ** 2


class NanInner(Inner):
    def training_step(self, batch):
        return super().training_step(batch) * float("nan")


def test_non_tensor_loss():
    engine, _, _ = bilevel(inner_cls=FloatInner)
    with pytest.raises(TypeError, match=r"problem 'inner'.*scalar tensor, got float \(iteration 1\)"):
        engine.run()


def test_non_scalar_loss():
    engine, _, _ = bilevel(inner_cls=VectorInner)
    with pytest.raises(ValueError, match=r"problem 'inner'.*shape \(8,\) at iteration 1.*loss.mean\(\)"):
        engine.run()


@pytest.mark.parametrize("method", ["unroll", "cg"])
def test_nan_loss_raises_with_problem_and_step(method):
    engine, _, _ = bilevel(ProblemConfig(hypergrad=method), inner_cls=NanInner)
    with pytest.raises(FloatingPointError, match=r"problem 'inner'.*nan at iteration 1.*on_nonfinite='skip'"):
        engine.run()


@pytest.mark.parametrize("method", ["unroll", "cg"])
def test_nan_loss_can_be_skipped(method):
    engine, inner, outer = bilevel(ProblemConfig(hypergrad=method, on_nonfinite="skip"), inner_cls=NanInner)
    before = inner.module.weight.detach().clone()
    engine.run()
    assert engine.status("inner").skipped == 4
    assert torch.equal(before, inner.module.weight)
    assert engine.status("outer").steps == 0


# --------------------------------------------------------------------------- data
def test_exhausted_generator_cannot_be_cycled():
    data = (b for b in batches(2))
    engine, _, _ = bilevel(inner_data=data, engine_config=EngineConfig(train_iters=3))
    with pytest.raises(
        ValueError, match=r"problem 'inner': its data ran out at iteration 3.*one-shot iterator"
    ):
        engine.run()


def test_empty_data():
    engine, _, _ = bilevel(inner_data=[])
    with pytest.raises(ValueError, match=r"problem 'inner': its data ran out.*empty"):
        engine.run()


def test_non_iterable_data():
    engine, _, _ = bilevel(inner_data=42)
    with pytest.raises(TypeError, match=r"problem 'inner': data of type int is not iterable"):
        engine.run()


def test_missing_data():
    net = nn.Linear(3, 1)
    inner = Inner("inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    engine = Engine([inner], config=EngineConfig(train_iters=1))
    with pytest.raises(ValueError, match=r"problem 'inner' has no data"):
        engine.run()


# --------------------------------------------------------------------------- parameters and optimizers
def test_problem_without_optimizer():
    inner = Inner("inner", module=nn.Linear(3, 1), data=batches())
    with pytest.raises(ValueError, match=r"problem 'inner' has no optimizer.*torch.optim.SGD"):
        Engine([inner])


def test_problem_without_module():
    inner = Inner("inner", optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), data=batches())
    with pytest.raises(ValueError, match=r"problem 'inner' has no module"):
        Engine([inner])


def test_optimizer_over_foreign_tensors():
    stray = nn.Parameter(torch.zeros(2, 2))
    inner = Inner("inner", module=nn.Linear(3, 1), optimizer=torch.optim.SGD([stray], lr=0.1), data=batches())
    with pytest.raises(
        ValueError, match=r"problem 'inner'.*shape \(2, 2\) that is not a parameter of its module"
    ):
        Engine([inner])


def test_module_without_parameters_needing_an_optimizer():
    with pytest.raises(ValueError, match="empty parameter list"):  # torch itself refuses the optimizer
        torch.optim.SGD(nn.ReLU().parameters(), lr=0.1)
    inner = Inner(
        "inner", module=nn.ReLU(), optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    )
    with pytest.raises(ValueError, match="not a parameter of its module"):
        Engine([inner])


def test_unroll_refuses_an_optimizer_it_cannot_differentiate():
    with pytest.raises(TypeError, match=r"problem 'inner'.*RMSprop.*\['SGD', 'Adam', 'AdamW'\]"):
        bilevel(ProblemConfig(hypergrad="unroll"), inner_optimizer=lambda p: torch.optim.RMSprop(p, lr=0.1))
    # implicit methods never step through the optimizer, so any optimizer works with them
    engine, _, _ = bilevel(
        ProblemConfig(hypergrad="cg"), inner_optimizer=lambda p: torch.optim.RMSprop(p, lr=0.01)
    )
    engine.run()


def test_unrolled_lower_of_an_implicit_middle_read_from_above_is_refused_with_the_fixes():
    # mid's total stationarity needs low's best response, which unrolled steps do not define
    net_a, net_b, scale = nn.Linear(3, 1), nn.Linear(3, 1), Scale()
    low = Inner("low", module=net_a, optimizer=torch.optim.SGD(net_a.parameters(), lr=0.1), data=batches())
    mid = Inner(
        "mid", module=net_b, optimizer=torch.optim.SGD(net_b.parameters(), lr=0.1), data=batches(),
        config=ProblemConfig(hypergrad="cg"),
    )
    top = Outer("top", module=scale, optimizer=torch.optim.SGD(scale.parameters(), lr=0.1), data=batches())
    with pytest.raises(
        ValueError, match=r"problem 'low' uses hypergrad='unroll' below 'mid'.*unroll 'mid' too, or set ProblemConfig\(nested='partial'\)"
    ):
        Engine([top, mid, low], {"u2l": {top: [mid], mid: [low]}, "l2u": {low: [mid], mid: [top]}})


# --------------------------------------------------------------------------- configs and names
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hypergrad": "magic"}, r"hypergrad='magic' is invalid: choose one of \['unroll'"),
        ({"unroll_steps": 0}, r"unroll_steps=0 is invalid: use an integer >= 1"),
        ({"truncate": -1}, r"truncate=-1"),
        ({"alpha": -0.1}, r"alpha=-0.1"),
        ({"on_nonfinite": "ignore"}, r"on_nonfinite='ignore'.*\['raise', 'skip'\]"),
        ({"damping": -1.0}, r"damping=-1.0"),
    ],
)
def test_problem_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProblemConfig(**kwargs)


def test_engine_config_validation():
    with pytest.raises(ValueError, match=r"EngineConfig.train_iters=0"):
        EngineConfig(train_iters=0)
    with pytest.raises(ValueError, match=r"EngineConfig.valid_every=-1"):
        EngineConfig(valid_every=-1)


@pytest.mark.parametrize("name", ["2fast", "with space", "class", "_private", "training_step", "module"])
def test_invalid_problem_names(name):
    with pytest.raises(ValueError, match="problem name"):
        Inner(name)


def test_problem_belongs_to_one_engine():
    inner, outer = _problems()
    Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    with pytest.raises(ValueError, match="already belongs to another Engine"):
        Engine([inner])


def test_abstract_training_step():
    from betty_like import Problem

    class Forgot(Problem):
        pass

    with pytest.raises(TypeError, match="training_step"):
        Forgot("forgot")


class ConcaveInner(Inner):
    def training_step(self, batch):
        x, _ = batch
        return -((self.module(x).squeeze(-1) * self.outer.module.scale) ** 2).mean()


def test_cg_reports_negative_curvature_once_and_damping_is_a_remedy(caplog):
    engine, _, _ = bilevel(
        ProblemConfig(hypergrad="cg"), inner_cls=ConcaveInner, engine_config=EngineConfig(train_iters=3)
    )
    with caplog.at_level("WARNING", logger="betty_like"):
        engine.run()
    warnings = [r for r in caplog.records if "non-positive curvature" in r.getMessage()]
    assert len(warnings) == 1 and "damping" in warnings[0].getMessage()
    assert engine.status("outer").diagnostics["inner"].solve.negative_curvature


def test_first_order_only_layers_refuse_second_order_methods():
    class FirstOrderOnly(nn.Linear):
        first_order_only = True

    for method in ("unroll", "cg"):
        with pytest.raises(ValueError, match=rf"problem 'inner' uses hypergrad='{method}'.*\['FirstOrderOnly'\]"):
            bilevel(ProblemConfig(hypergrad=method), inner_module=FirstOrderOnly(3, 1))
    engine, _, _ = bilevel(ProblemConfig(hypergrad="darts"), inner_module=FirstOrderOnly(3, 1))
    engine.run()
