"""A problem may use a conv algorithm policy and compiled execution at once.

The engine swaps the conv algorithms in when it is built and captures the plain steps afterwards, so
the captured graph runs the swapped layers. In float64 the trajectory must equal plain eager torch up
to rounding (1e-9, as for each backend alone).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig


class Classify(Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.module(x), y)


def _train(backend: str | None, execution: str) -> torch.Tensor:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(256, 10)
    ).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=g), torch.arange(8)) for _ in range(2)]
    problem = Classify(
        "classify",
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        data=batches,
        config=ProblemConfig(backends={"conv2d": backend} if backend is not None else {}, execution=execution),
    )
    Engine([problem], config=EngineConfig(train_iters=6)).run()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


# Dynamo warns when it traces through an ``lru_cache``; the Winograd transforms once sat behind one.
@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("backend", ["im2col", ["winograd", "im2col"]])
def test_compiled_steps_through_swapped_convs_follow_eager_torch(backend):
    reference = _train(None, "eager")
    torch.testing.assert_close(_train(backend, "compiled"), reference, rtol=0.0, atol=1e-9)
