"""Tiny problems for schedule and error tests: counters instead of closed forms."""

from __future__ import annotations

import torch
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig


class Inner(Problem):
    """Lower level: fits y with a linear model, each example's loss scaled by the outer problem's weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def training_step(self, batch):
        self.calls += 1
        x, y = batch
        return (self.outer.module.scale * (self.module(x).squeeze(-1) - y) ** 2).mean()


class Outer(Problem):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def training_step(self, batch):
        self.calls += 1
        x, y = batch
        return ((self.inner(x).squeeze(-1) - y) ** 2).mean()


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))


def batches(n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, generator=g), torch.randn(8, generator=g)) for _ in range(n)]


def bilevel(
    inner_config: ProblemConfig | None = None,
    outer_config: ProblemConfig | None = None,
    engine_config: EngineConfig | None = None,
    inner_cls: type[Problem] = Inner,
    outer_cls: type[Problem] = Outer,
    inner_data=None,
    inner_optimizer=None,
    outer_lr: float = 0.01,
    inner_module: nn.Module | None = None,
) -> tuple[Engine, Problem, Problem]:
    net = nn.Linear(3, 1) if inner_module is None else inner_module
    scale = Scale()
    inner = inner_cls(
        "inner",
        module=net,
        optimizer=inner_optimizer(net.parameters())
        if inner_optimizer
        else torch.optim.SGD(net.parameters(), lr=0.05),
        data=batches() if inner_data is None else inner_data,
        config=inner_config or ProblemConfig(),
    )
    outer = outer_cls(
        "outer",
        module=scale,
        optimizer=torch.optim.SGD(scale.parameters(), lr=outer_lr),
        data=batches(seed=1),
        config=outer_config or ProblemConfig(),
    )
    engine = Engine(
        [outer, inner],
        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        config=engine_config or EngineConfig(train_iters=4),
    )
    return engine, inner, outer
