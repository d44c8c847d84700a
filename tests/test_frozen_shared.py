"""Frozen parameters are skipped as torch.optim skips them; a parameter in two problems is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy import Inner, Outer, Scale, batches, bilevel

from betty_like import Engine, EngineConfig, ProblemConfig

METHODS = ["unroll", "first_order", "darts", "sama", "cg", "neumann", "fixed_point"]


def frozen_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    return net


@pytest.mark.parametrize("method", METHODS)
def test_a_parameter_frozen_after_building_the_optimizer_is_skipped_by_every_method(method):
    net = frozen_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    net[0].weight.requires_grad_(False)  # as every fine-tuning script does, after the optimizer
    frozen = net[0].weight.clone()
    trained = net[2].weight.clone()
    # the MLP is far from a minimum (indefinite Hessian): implicit series may diverge, which is not the point here
    config = ProblemConfig(hypergrad=method, on_solver_failure="ignore", iterations=5)
    engine, _, outer = bilevel(config, inner_module=net, inner_optimizer=lambda p: optimizer)
    engine.run()
    assert torch.equal(net[0].weight, frozen)
    assert not torch.equal(net[2].weight, trained)
    assert "inner.0.weight" not in engine.program().levels["inner"].params
    assert torch.isfinite(outer.module.scale.detach()).all()


def test_an_upper_with_a_frozen_parameter_in_its_optimizer_steps_the_others():
    class TwoScales(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.unused = nn.Parameter(torch.zeros(3))

    net, scales = nn.Linear(3, 1), TwoScales()
    optimizer = torch.optim.SGD(scales.parameters(), lr=0.01)
    scales.unused.requires_grad_(False)
    inner = Inner("inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), data=batches(),
                  config=ProblemConfig(hypergrad="cg"))
    outer = Outer("outer", module=scales, optimizer=optimizer, data=batches(seed=1))
    engine = Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}, EngineConfig(train_iters=3))
    engine.run()
    assert torch.equal(scales.unused.detach(), torch.zeros(3))
    assert float(scales.scale.detach()) != 1.0
    assert set(engine.status("outer").gradient) == {"outer.scale"}


def test_every_parameter_frozen_is_named():
    net = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    net.requires_grad_(False)
    with pytest.raises(ValueError, match=r"problem 'inner': every parameter in its optimizer is frozen \(requires_grad=False, 2 tensors\)"):
        bilevel(inner_module=net, inner_optimizer=lambda p: optimizer)


def test_a_parameter_in_two_problems_names_both():
    shared = nn.Linear(3, 1)
    scale = Scale()
    inner = Inner("inner", module=shared, optimizer=torch.optim.SGD(shared.parameters(), lr=0.05), data=batches())
    holder = nn.Module()
    holder.scale = scale.scale
    holder.copy = shared  # the same Linear registered in a second problem
    outer = Outer("outer", module=holder, optimizer=torch.optim.SGD(holder.parameters(), lr=0.01), data=batches(seed=1))
    with pytest.raises(ValueError, match=r"trained by two problems, as 'outer.copy.weight' and as 'inner.weight'|trained by two problems, as 'inner.weight' and as 'outer.copy.weight'"):
        Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})


# --------------------------------------------------------------------------- raw errors, named
class ConstantOuter(Outer):
    def training_step(self, batch):
        return torch.tensor(1.0)


class DetachedOuter(Outer):
    def training_step(self, batch):
        return super().training_step(batch).detach()


class IntegerOuter(Outer):
    def training_step(self, batch):
        return torch.tensor(1)


@pytest.mark.parametrize(
    ("outer_cls", "error", "message"),
    [
        (ConstantOuter, ValueError, r"problem 'outer': training_step returned a loss that depends on no parameter"),
        (DetachedOuter, ValueError, r"problem 'outer'.*detached by \.item\(\), \.detach\(\)"),
        (IntegerOuter, TypeError, r"problem 'outer': training_step returned a loss of dtype torch.int64"),
    ],
)
def test_constant_detached_and_integer_losses_are_named(outer_cls, error, message):
    engine, _, _ = bilevel(ProblemConfig(hypergrad="cg"), outer_cls=outer_cls)
    with pytest.raises(error, match=message):
        engine.run()


def test_schedulers_the_engine_cannot_step_are_refused_when_it_is_built():
    net, scale = nn.Linear(3, 1), Scale()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    cases = [
        (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer), TypeError, r"ReduceLROnPlateau needs a metric"),
        ("cosine", TypeError, r"scheduler must be a torch.optim.lr_scheduler.LRScheduler.*got str"),
        (
            torch.optim.lr_scheduler.StepLR(torch.optim.SGD(scale.parameters(), lr=0.1), 1),
            ValueError,
            r"its scheduler drives another optimizer",
        ),
    ]
    for scheduler, error, message in cases:
        inner = Inner("inner", module=net, optimizer=optimizer, scheduler=scheduler, data=batches())
        with pytest.raises(error, match=rf"problem 'inner': .*{message}|problem 'inner': {message}"):
            Engine([inner])
