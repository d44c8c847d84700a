"""The engine's schedule: unroll_steps, step_every, warm-up, clipping, schedulers, seeds, validation."""

import pytest
import torch
from torch import nn
from toy import Inner, Outer, batches, bilevel

from betty_like import EngineConfig, ProblemConfig


@pytest.mark.parametrize("method", ["unroll", "cg", "darts"])
def test_unroll_steps_sets_inner_steps_per_outer_step(method):
    engine, inner, outer = bilevel(
        ProblemConfig(hypergrad=method, unroll_steps=3), engine_config=EngineConfig(train_iters=9)
    )
    engine.run()
    assert engine.status("inner").steps == 9
    assert engine.status("outer").steps == 3


def test_step_every_makes_the_upper_problem_wait_for_more_rounds():
    engine, _, _ = bilevel(
        ProblemConfig(unroll_steps=2), ProblemConfig(step_every=3), EngineConfig(train_iters=12)
    )
    engine.run()
    assert engine.status("outer").steps == 2


def test_warmup_steps_do_not_count_towards_the_upper_problem():
    engine, _, _ = bilevel(ProblemConfig(warmup_steps=4), engine_config=EngineConfig(train_iters=6))
    engine.run()
    assert engine.status("inner").steps == 6
    assert engine.status("outer").steps == 2


def test_unrolled_weights_are_written_back_into_the_module_and_optimizer():
    engine, inner, _ = bilevel(
        ProblemConfig(hypergrad="unroll", unroll_steps=2),
        engine_config=EngineConfig(train_iters=2),
        inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    )
    before = inner.module.weight.detach().clone()
    engine.run()
    assert not torch.equal(before, inner.module.weight)
    assert inner.module.weight.is_leaf and inner.module.weight.grad_fn is None
    buffer = inner.optimizer.state[inner.module.weight]["momentum_buffer"]
    assert buffer.grad_fn is None and buffer.abs().sum() > 0


def test_unroll_and_plain_optimizer_steps_take_the_same_trajectory():
    # the differentiable steps must move the weights exactly as the user's optimizer would
    results = []
    for method in ("unroll", "cg"):
        torch.manual_seed(0)
        engine, inner, _ = bilevel(
            ProblemConfig(hypergrad=method, unroll_steps=5),
            engine_config=EngineConfig(train_iters=4),
            inner_optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
            outer_lr=0.0,  # a fixed upper problem, so both methods see the same inner losses
        )
        engine.run()
        results.append(inner.module.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_gradient_clipping_bounds_the_step():
    engine, inner, _ = bilevel(
        ProblemConfig(grad_clip=1e-3),
        engine_config=EngineConfig(train_iters=1),
        inner_optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
    )
    before = [p.detach().clone() for p in inner.module.parameters()]
    engine.run()
    change = torch.sqrt(
        sum(((p - b) ** 2).sum() for p, b in zip(inner.module.parameters(), before, strict=True))
    )
    assert float(change.detach()) == pytest.approx(1e-3, rel=1e-3)


def test_schedulers_step_with_their_problem():
    engine, inner, _ = bilevel(engine_config=EngineConfig(train_iters=3))
    inner.scheduler = torch.optim.lr_scheduler.StepLR(inner.optimizer, step_size=1, gamma=0.5)
    engine.run()
    assert inner.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**3)


def test_seed_makes_runs_repeatable():
    class NoisyInner(Inner):
        def training_step(self, batch):
            x, y = batch
            return super().training_step((x + 0.1 * torch.randn_like(x), y))

    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        engine, inner, _ = bilevel(engine_config=EngineConfig(train_iters=3, seed=7), inner_cls=NoisyInner)
        torch.manual_seed(123)  # the engine's seed, not this one, decides the noise
        engine.run()
        weights.append(inner.module.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_validation_step_is_called_every_valid_every_iterations():
    class ValidatedOuter(Outer):
        def validation_step(self):
            x, y = batches(1, seed=9)[0]
            return {"mse": ((self.inner(x).squeeze(-1) - y) ** 2).mean()}

    engine, _, _ = bilevel(engine_config=EngineConfig(train_iters=6, valid_every=2), outer_cls=ValidatedOuter)
    engine.run()
    assert [row["iteration"] for row in engine.validation_history] == [2, 4, 6]
    assert all(row["problem"] == "outer" and row["mse"] > 0 for row in engine.validation_history)


def test_data_is_cycled():
    engine, inner, _ = bilevel(inner_data=batches(2), engine_config=EngineConfig(train_iters=5))
    engine.run()
    assert engine.status("inner").steps == 5


def test_history_records_losses_every_log_every():
    engine, _, _ = bilevel(engine_config=EngineConfig(train_iters=4, log_every=2))
    engine.run()
    assert [(r["iteration"], r["problem"]) for r in engine.history] == [
        (2, "outer"),
        (2, "inner"),
        (4, "outer"),
        (4, "inner"),
    ]


def test_problems_reach_each_other_by_name():
    engine, inner, outer = bilevel()
    assert inner.outer is outer and outer.inner is inner
    with pytest.raises(AttributeError, match=r"no attribute 'missing'.*\['inner', 'outer'\]"):
        _ = inner.missing


def test_user_modules_are_not_modified_by_the_engine():
    engine, inner, _ = bilevel(ProblemConfig(hypergrad="unroll", unroll_steps=2))
    names = [n for n, _ in inner.module.named_parameters()]
    engine.run()
    assert [n for n, _ in inner.module.named_parameters()] == names
    assert all(isinstance(p, nn.Parameter) for p in inner.module.parameters())


def test_device_moves_modules_and_batches():
    class DeviceCheckingInner(Inner):
        def training_step(self, batch):
            x, _ = batch
            if x.device != self.module.weight.device:
                raise RuntimeError("batch and module on different devices")
            return super().training_step(batch)

    engine, inner, _ = bilevel(
        engine_config=EngineConfig(train_iters=2, device="cpu"), inner_cls=DeviceCheckingInner
    )
    engine.run()
    assert inner.module.weight.device.type == "cpu" and engine.status("outer").steps == 2


def test_an_unrolled_lower_read_by_two_uppers_serves_both(caplog):
    # both uppers compute their gradients through the same window before either commits
    from toy import Scale

    net, s1, s2 = nn.Linear(3, 1), Scale(), Scale()

    class SharedInner(Inner):
        def training_step(self, batch):
            x, y = batch
            return (
                self.first.module.scale * self.second.module.scale * (self.module(x).squeeze(-1) - y) ** 2
            ).mean()

    inner = SharedInner(
        "inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), data=batches()
    )
    first = Outer("first", module=s1, optimizer=torch.optim.SGD(s1.parameters(), lr=0.01), data=batches())
    second = Outer("second", module=s2, optimizer=torch.optim.SGD(s2.parameters(), lr=0.01), data=batches())
    from betty_like import Engine

    engine = Engine(
        [first, second, inner],
        {"u2l": {first: [inner], second: [inner]}, "l2u": {inner: [first, second]}},
        EngineConfig(train_iters=2),
    )
    with caplog.at_level("WARNING", logger="betty_like"):
        engine.run()
    assert not caplog.records
    for name in ("first", "second"):
        gradient = engine.status(name).gradient[f"{name}.scale"]
        assert torch.isfinite(gradient) and gradient.abs() > 0


def test_a_shuffled_dataloader_yields_the_batches_of_a_plain_loop_epoch_after_epoch():
    # the engine must draw each epoch's shuffle exactly when a plain `for` loop over the loader would
    from torch.utils.data import DataLoader, TensorDataset

    from betty_like import Engine, Problem

    def loader():
        data = TensorDataset(torch.arange(10.0).unsqueeze(1))
        return DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))

    class Recorder(Problem):
        seen: list = []

        def training_step(self, batch):
            self.seen.append(batch[0].clone())
            return (self.module(batch[0]) ** 2).mean()

    plain = loader()
    expected = [batch[0] for _epoch in range(3) for batch in plain]
    net = nn.Linear(1, 1)
    problem = Recorder("p", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0), data=loader())
    Engine([problem], config=EngineConfig(train_iters=len(expected))).run()
    for a, b in zip(problem.seen, expected, strict=True):
        assert torch.equal(a, b)
