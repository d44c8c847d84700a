"""A plain engine step is a hand-written torch loop plus its checks: equal results, checks still on.

The engine's plain step was trimmed for speed (one host read for the loss and the gradient's
finiteness, a numpy generator snapshot reused while nothing drew, callbacks dispatched only to the
ones that override a hook). These tests pin what must not change with it.
"""

from __future__ import annotations

import copy
import random

import numpy
import pytest
import torch
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.callbacks import Callback


class Regression(Problem):
    def training_step(self, batch):
        x, y = batch
        return ((self.module(x).squeeze(-1) - y) ** 2).mean()


def batches(count: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=g), torch.randn(16, generator=g)) for _ in range(count)]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_engine_plain_steps_equal_a_hand_written_loop_bit_for_bit(optimizer):
    data, steps = batches(), 7
    module = net()
    reference = copy.deepcopy(module)
    problem = Regression("p", module=module, optimizer=OPTIMIZERS[optimizer](module.parameters()), data=data)
    Engine([problem], config=EngineConfig(train_iters=steps)).run()

    hand_optimizer = OPTIMIZERS[optimizer](reference.parameters())  # the reference: plain torch, no betty_like
    for i in range(steps):
        x, y = data[i % len(data)]
        loss = ((reference(x).squeeze(-1) - y) ** 2).mean()
        hand_optimizer.zero_grad()
        loss.backward()
        hand_optimizer.step()

    for (name, a), b in zip(module.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name
    hand_state = hand_optimizer.state_dict()["state"]
    for key, state in problem.optimizer.state_dict()["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(hand_state[key][field])), (key, field)


def test_the_recorded_loss_is_the_loss_of_the_last_step():
    data = batches(1)
    module = net()
    reference = copy.deepcopy(module)
    engine = Engine([Regression("p", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1), data=data)])
    engine.run(1)
    x, y = data[0]
    assert engine.status("p").loss == ((reference(x).squeeze(-1) - y) ** 2).mean().item()


class NanLoss(Regression):
    def training_step(self, batch):
        return super().training_step(batch) * float("nan")


def test_a_non_finite_loss_of_a_plain_step_raises_before_the_optimizer_steps():
    module = net()
    before = [p.detach().clone() for p in module.parameters()]
    engine = Engine([NanLoss("p", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1), data=batches())])
    with pytest.raises(FloatingPointError, match=r"problem 'p': training_step returned nan at iteration 1 .*on_nonfinite='skip'"):
        engine.run(1)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert engine.iteration == 0


def test_a_non_finite_loss_of_a_plain_step_can_be_skipped():
    module = net()
    before = [p.detach().clone() for p in module.parameters()]
    problem = NanLoss(
        "p", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1), data=batches(),
        config=ProblemConfig(on_nonfinite="skip"),
    )
    engine = Engine([problem])
    engine.run(4)
    assert engine.status("p").skipped == 4 and engine.status("p").steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


class NanInOneEntry(Regression):
    """A finite loss whose gradient is NaN in the first layer's bias only (sqrt at a negative input)."""

    def training_step(self, batch):
        bias = self.module[0].bias
        masked = torch.where(bias > 1e9, torch.sqrt(bias - 1e9), torch.zeros_like(bias)).sum()
        return super().training_step(batch) + masked


def test_a_nan_gradient_entry_is_named_alone():
    module = net()
    engine = Engine([NanInOneEntry("p", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1), data=batches())])
    with pytest.raises(FloatingPointError, match=r"its gradient is NaN/inf in \['p\.0\.bias'\] while its loss is finite"):
        engine.run(1)


class Huge(Regression):
    """Finite float32 gradients whose norm overflows: no entry is non-finite, so the step is taken."""

    def training_step(self, batch):
        return super().training_step(batch) + 1e30 * self.module[0].weight.sum()


def test_a_finite_gradient_whose_norm_overflows_is_not_refused():
    module = net()
    engine = Engine([Huge("p", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=1e-40), data=batches())])
    engine.run(1)
    assert engine.status("p").steps == 1 and engine.status("p").skipped == 0


class Recorder(Callback):
    def __init__(self, calls: list[str], tag: str) -> None:
        self.calls, self.tag = calls, tag

    def on_step_start(self, engine, name):
        self.calls.append(f"{self.tag}:start:{name}")

    def on_step_end(self, engine, name):
        self.calls.append(f"{self.tag}:end:{name}:{engine.status(name).steps}")

    def on_iteration_end(self, engine):
        self.calls.append(f"{self.tag}:iteration:{engine.iteration}")


class OnlyRunEnd(Callback):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def on_run_end(self, engine):
        self.calls.append("run_end")


def test_callbacks_are_called_in_order_including_ones_added_after_the_engine_was_built():
    calls: list[str] = []
    module = net()
    problem = Regression("p", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1), data=batches())
    engine = Engine([problem], callbacks=[Recorder(calls, "a"), OnlyRunEnd(calls)])
    engine.run(1)
    assert calls == ["a:start:p", "a:end:p:1", "a:iteration:1", "run_end"]
    calls.clear()
    engine.callbacks.items.insert(0, Recorder(calls, "b"))
    engine.run(1)
    assert calls == ["b:start:p", "a:start:p", "b:end:p:2", "a:end:p:2", "b:iteration:2", "a:iteration:2", "run_end"]


class Noisy(Regression):
    """Draws from numpy (an odd count leaves a cached legacy Gaussian, the next draw spends it) and Python."""

    fail_at: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def training_step(self, batch):
        self.calls += 1
        noise = float(numpy.random.randn(len(batch[0]) % 3).sum()) + random.random()  # 1, 2, 0 draws by batch
        if self.calls == self.fail_at:
            raise RuntimeError("injected")
        return super().training_step(batch) + noise * self.module[0].bias.sum()


def noisy_run(fail_at: int | None) -> list[torch.Tensor]:
    numpy.random.seed(3)
    random.seed(3)
    module = net()
    data = [(x[: 16 - i], y[: 16 - i]) for i, (x, y) in enumerate(batches())]  # 16, 15, 14 rows
    problem = Noisy("p", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.01), data=data)
    problem.fail_at = fail_at
    engine = Engine([problem], config=EngineConfig(train_iters=8, seed=0))
    if fail_at is not None:
        with pytest.raises(RuntimeError, match="injected"):
            engine.run()
    engine.run()
    assert engine.iteration == 8
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("fail_at", [2, 3, 4, 6])
def test_a_failed_step_puts_back_numpy_and_python_randomness(fail_at):
    """The wave's snapshot of numpy's generator is reused while nothing drew: a run interrupted at any
    point of the Gaussian cache's cycle and run again equals an uninterrupted one."""
    for a, b in zip(noisy_run(fail_at), noisy_run(None), strict=True):
        assert torch.equal(a, b)
