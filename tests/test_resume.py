"""An exception or Ctrl-C leaves the engine consistent, and ``run()`` again continues bit for bit.

Both problems draw random numbers (dropout) in every loss evaluation, including those inside the
hypergradient, and keep optimizer state (Adam, momentum), so any replayed or skipped batch, random
draw, counter or state shows up as a difference.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toy import Scale, batches

from betty_like import Engine, EngineConfig, Problem, ProblemConfig

ITERATIONS = 10


class Interruptible(Problem):
    """Counts its loss evaluations and raises ``error`` at evaluation ``fail_at`` (once)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.fail_at: int | None = None
        self.error: type[BaseException] = KeyboardInterrupt

    def tick(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            self.fail_at = None
            raise self.error(f"injected at call {self.calls}")


class Inner(Interruptible):
    def training_step(self, batch):
        self.tick()
        x, y = batch
        x = F.dropout(x, 0.3, training=True)
        return (self.outer.module.scale * (self.module(x).squeeze(-1) - y) ** 2).mean()


class Outer(Interruptible):
    def training_step(self, batch):
        self.tick()
        x, y = batch
        x = F.dropout(x, 0.2, training=True)
        return ((self.inner(x).squeeze(-1) - y) ** 2).mean()


def build(method: str) -> tuple[Engine, Inner, Outer]:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    scale = Scale()
    inner = Inner(
        "inner",
        module=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=0.02),
        data=batches(3),
        config=ProblemConfig(hypergrad=method, unroll_steps=2, iterations=20, tol=1e-30),
    )
    outer = Outer(
        "outer", module=scale, optimizer=torch.optim.SGD(scale.parameters(), lr=0.05, momentum=0.9),
        data=batches(2, seed=1),
    )
    engine = Engine(
        [outer, inner],
        {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        EngineConfig(train_iters=ITERATIONS, seed=5),
    )
    return engine, inner, outer


def snapshot(engine: Engine) -> list[torch.Tensor]:
    tensors = []
    for problem in engine.problems.values():
        tensors += [p.detach().clone() for p in problem.module.parameters()]
        for state in problem.optimizer.state.values():
            tensors += [v.clone() for v in state.values() if torch.is_tensor(v)]
    return tensors


def assert_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x, y)


@pytest.mark.parametrize("method", ["unroll", "cg", "darts"])
@pytest.mark.parametrize("where", ["inner", "outer"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupt_then_run_again_equals_an_uninterrupted_run(method, where, error):
    reference, _, _ = build(method)
    reference.run()
    engine, inner, outer = build(method)
    victim = inner if where == "inner" else outer
    victim.error, victim.fail_at = error, 9 if where == "inner" else 3
    with pytest.raises(error, match="injected"):
        engine.run()
    assert engine.iteration < ITERATIONS  # the interrupted iteration is not counted
    current = engine.current_params()  # the user's modules hold the latest weights
    for name, param in inner.module.named_parameters():
        assert torch.equal(param.detach(), current[f"inner.{name}"].detach())
    engine.run()
    assert engine.iteration == ITERATIONS
    assert engine.status("outer").steps == reference.status("outer").steps
    assert_identical(snapshot(engine), snapshot(reference))


def test_partial_runs_continue_where_they_stopped_and_seed_once():
    reference, _, _ = build("unroll")
    reference.run()
    engine, _, _ = build("unroll")
    engine.run(iterations=3)
    engine.run(iterations=4)
    assert engine.iteration == 7
    engine.run()  # the rest, up to train_iters
    assert engine.iteration == ITERATIONS
    assert_identical(snapshot(engine), snapshot(reference))
    with pytest.raises(ValueError, match=r"run\(iterations=-1\) is invalid"):
        engine.run(iterations=-1)


def test_an_error_names_the_problem_whose_code_raised():
    engine, inner, _ = build("cg")
    inner.error, inner.fail_at = ValueError, 2
    with pytest.raises(ValueError, match="injected") as info:
        engine.run()
    assert any("problem 'inner'" in note for note in getattr(info.value, "__notes__", ["problem 'inner'"]))
