"""Misconfigurations that used to run silently wrong or fail with a raw error are named.

Each test checks the message (problem, value, fix) and, where the mistake is caught before a step,
that nothing changed.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from toy import Inner, Outer, Scale, batches, bilevel

from betty_like import Engine, EngineConfig, ProblemConfig


class PlainInner(Inner):
    """A lower loss that ignores the upper problem."""

    def training_step(self, batch):
        x, y = batch
        return ((self.module(x).squeeze(-1) - y) ** 2).mean()


def problems(inner_cls=PlainInner, outer_cls=Outer, inner_optimizer=None, inner_config=None):
    torch.manual_seed(0)
    net, scale = nn.Linear(3, 1), Scale()
    optimizer = inner_optimizer(net.parameters()) if inner_optimizer else torch.optim.SGD(net.parameters(), lr=0.1)
    inner = inner_cls("inner", module=net, optimizer=optimizer, data=batches(), config=inner_config or ProblemConfig())
    outer = outer_cls("outer", module=scale, optimizer=torch.optim.SGD(scale.parameters(), lr=0.1), data=batches(seed=1))
    return inner, outer


def parameters(*found) -> list[torch.Tensor]:
    return [t.detach().clone() for p in found for t in p.module.parameters()]


# --------------------------------------------------------------------------- reads without an edge
def test_an_upper_reading_a_lower_without_edges_is_named_before_it_steps():
    # without the check the upper's loss reads the lower's weights as constants: its gradient is empty, it never moves
    inner, outer = problems()
    engine = Engine([outer, inner], config=EngineConfig(train_iters=2))
    before = parameters(outer, inner)
    with pytest.raises(ValueError) as error:
        engine.run()
    message = str(error.value)
    assert "problem 'outer': its training_step reads the parameters of ['inner'], but no edge connects" in message
    assert "add 'l2u': {'inner': ['outer']}" in message and "detach what you read" in message
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(outer, inner), strict=True))


def test_a_lower_reading_its_upper_without_a_u2l_edge_is_named():
    inner, outer = problems(inner_cls=Inner)  # Inner's loss is scaled by outer's parameter
    engine = Engine([outer, inner], {"l2u": {inner: [outer]}}, EngineConfig(train_iters=2))
    with pytest.raises(ValueError, match=r"problem 'inner': its training_step reads the parameters of \['outer'\]") as error:
        engine.run()
    assert "add 'u2l': {'outer': ['inner']}" in str(error.value)


def test_reads_along_edges_pass_and_a_detached_read_is_a_constant():
    engine, _, _ = bilevel(ProblemConfig(hypergrad="cg"))
    engine.run()  # Inner reads outer (u2l), Outer reads inner (l2u)

    class DetachedOuter(Outer):
        def training_step(self, batch):
            x, y = batch
            return ((self.inner(x).detach().squeeze(-1) - y) ** 2).mean() + self.module.scale**2

    inner, outer = problems(outer_cls=DetachedOuter)
    Engine([outer, inner], config=EngineConfig(train_iters=2)).run()


# --------------------------------------------------------------------------- a lower loss that ignores its upper
def messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_lower_loss_ignoring_its_upper_warns_once_naming_both(caplog):
    inner, outer = problems(inner_config=ProblemConfig(hypergrad="cg"))
    engine = Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}, EngineConfig(train_iters=3))
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        engine.run()
    (message,) = messages(caplog, "identically zero")
    assert "problem 'inner': its training_step does not depend on the parameters of 'outer'" in message
    assert "u2l edge 'outer' -> 'inner'" in message and "or remove the edge" in message
    assert float(engine.status("outer").gradient["outer.scale"]) == 0.0  # what the warning says


@pytest.mark.parametrize("config", [ProblemConfig(hypergrad="cg"), ProblemConfig(hypergrad="unroll", unroll_steps=3, truncate=1)])
def test_a_lower_loss_reading_its_upper_gives_no_warning(caplog, config):
    # truncated unrolled steps evaluate the lower loss with the upper detached: that is no evidence of ignoring it
    engine, _, _ = bilevel(config, engine_config=EngineConfig(train_iters=6))
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        engine.run()
    assert messages(caplog, "identically zero") == []


# --------------------------------------------------------------------------- what training_step must not do
class BackwardInner(Inner):
    retain = False

    def training_step(self, batch):
        loss = super().training_step(batch)
        loss.backward(retain_graph=self.retain)
        return loss


class RetainingInner(BackwardInner):
    retain = True


class SteppingInner(Inner):
    def training_step(self, batch):
        loss = super().training_step(batch)
        self.optimizer.step()
        return loss


class SteppingOuter(Outer):
    def training_step(self, batch):
        self.inner.optimizer.step()
        return super().training_step(batch)


@pytest.mark.parametrize("inner_cls", [BackwardInner, RetainingInner])
@pytest.mark.parametrize("method", ["cg", "unroll"])
def test_backward_inside_training_step_is_named(inner_cls, method):
    engine, inner, outer = bilevel(ProblemConfig(hypergrad=method), inner_cls=inner_cls)
    with pytest.raises(RuntimeError, match=r"problem 'inner': its training_step called backward\(\)") as error:
        engine.run()
    assert "Remove loss.backward()" in str(error.value)


def test_optimizer_step_inside_training_step_is_refused_before_it_changes_anything():
    engine, inner, outer = bilevel(ProblemConfig(hypergrad="cg"), inner_cls=SteppingInner)
    before = parameters(inner, outer)
    with pytest.raises(RuntimeError, match=r"problem 'inner': its training_step called its own optimizer's step\(\) \(SGD\)"):
        engine.run()
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(inner, outer), strict=True))
    engine, inner, outer = bilevel(ProblemConfig(hypergrad="cg"), outer_cls=SteppingOuter)
    before = parameters(outer)
    with pytest.raises(RuntimeError, match=r"problem 'outer': .*called the optimizer of problem 'inner''s step\(\)"):
        engine.run()
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(outer), strict=True))


def test_optimizer_step_outside_the_engine_is_not_affected():
    engine, inner, _ = bilevel(ProblemConfig(hypergrad="cg"))
    engine.run(1)
    inner.optimizer.step()  # the user's own loop around the engine: allowed


@pytest.mark.parametrize("method", ["cg", "neumann", "unroll", "first_order"])
def test_closure_optimizers_are_refused_at_build(method):
    with pytest.raises(TypeError) as error:
        inner, outer = problems(inner_cls=Inner, inner_optimizer=lambda p: torch.optim.LBFGS(p), inner_config=ProblemConfig(hypergrad=method))
        Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    message = str(error.value)
    assert "problem 'inner': its optimizer LBFGS needs a closure" in message and "torch.optim.SGD" in message


def test_a_closure_optimizer_on_a_problem_alone_is_refused_too():
    net = nn.Linear(3, 1)
    inner = PlainInner("inner", module=net, optimizer=torch.optim.LBFGS(net.parameters()), data=batches())
    with pytest.raises(TypeError, match=r"problem 'inner': its optimizer LBFGS needs a closure"):
        Engine([inner])


# --------------------------------------------------------------------------- a NaN gradient in a plain step
class SqrtInner(PlainInner):
    """A finite loss with a NaN gradient: torch.where differentiates the sqrt of a negative number too."""

    def training_step(self, batch):
        x, _ = batch
        prediction = self.module(x).squeeze(-1)
        shifted = prediction - 100.0
        return torch.where(shifted > 0, torch.sqrt(shifted), torch.zeros_like(shifted)).mean() + super().training_step(batch)


def test_a_nan_gradient_in_a_plain_step_is_caught_before_the_optimizer():
    net = nn.Linear(3, 1)
    inner = SqrtInner("inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=batches())
    engine = Engine([inner], config=EngineConfig(train_iters=2))
    before = parameters(inner)
    with pytest.raises(FloatingPointError) as error:
        engine.run()
    message = str(error.value)
    assert "problem 'inner' at its step 1 (iteration 1): its gradient is NaN/inf in ['inner.weight', 'inner.bias']" in message
    assert "while its loss is finite" in message and "mask the input of sqrt/log" in message
    assert "ProblemConfig(on_nonfinite='skip') on 'inner'" in message
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(inner), strict=True))


def test_a_nan_gradient_in_a_plain_step_can_be_skipped():
    net = nn.Linear(3, 1)
    inner = SqrtInner(
        "inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=batches(),
        config=ProblemConfig(on_nonfinite="skip"),
    )
    engine = Engine([inner], config=EngineConfig(train_iters=3))
    before = parameters(inner)
    engine.run()
    assert engine.status("inner").skipped == 3
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(inner), strict=True))
