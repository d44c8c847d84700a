"""One rank of the data-parallel agreement test: ``python dist_worker.py RANK WORLD PORT OUT METHOD...``.

Run by ``tests/test_distributed.py`` (world 2, gloo on 127.0.0.1) and imported by it for the one-process
reference (world 1). A digits MLP with learnable per-example weights (the weights are indexed by example id,
so every rank weights its own shard's examples) under a validation loss; 20 iterations per method.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from test_digits_agreement import Validation  # run as a script from tests/, whose folder is on sys.path
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig

ITERATIONS = 20
# finite differences divide float32 rounding (the sum order of two shards) by 2 * eps: 3.4e-5 relative in
# float32, so darts and sama are compared in float64
DTYPES = {"darts": torch.float64, "sama": torch.float64}
# The untrained MLP's Hessian is indefinite, so these short solves may be reported as failed; this test is
# about one process and two giving the same arithmetic, whatever the solve's outcome: use the result.
CONFIGS = {
    "first_order": {"hypergrad": "first_order"},
    "unroll": {"hypergrad": "unroll"},
    "cg": {"hypergrad": "cg", "iterations": 10, "damping": 1.0, "on_solver_failure": "ignore"},
    "neumann": {"hypergrad": "neumann", "iterations": 10, "alpha": 0.3, "on_solver_failure": "ignore"},
    "fixed_point": {"hypergrad": "fixed_point", "iterations": 10, "on_solver_failure": "ignore"},
    "darts": {"hypergrad": "darts"},
    "sama": {"hypergrad": "sama"},
}


class WeightedMLP(Problem):
    def training_step(self, batch):
        x, y, idx = batch
        weights = torch.sigmoid(self.weights.module.logits[idx])
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        return (weights * losses).mean() + 0.5e-2 * sum((p**2).sum() for p in self.module.parameters())


class Logits(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n))


def run(method: str, distributed: bool) -> dict:
    """Upper gradients of every iteration and the final parameters of both problems."""
    x, y = load_digits(return_X_y=True)
    dtype = DTYPES.get(method, torch.float32)
    x, y = torch.tensor(x / 16.0, dtype=dtype), torch.tensor(y)
    train = [(x[i : i + 101], y[i : i + 101], torch.arange(i, i + 101)) for i in (0, 101, 202)]  # odd: unequal shards
    valid = [(x[400:499], y[400:499])]
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    mlp.to(dtype)
    weights = Logits(303).to(dtype)
    config = CONFIGS[method]
    lower = WeightedMLP(
        "mlp", module=mlp, optimizer=torch.optim.SGD(mlp.parameters(), lr=0.3), data=train, config=ProblemConfig(**config)
    )
    upper = Validation("weights", module=weights, optimizer=torch.optim.SGD(weights.parameters(), lr=10.0), data=valid)
    engine = Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        EngineConfig(train_iters=ITERATIONS, distributed=distributed),
    )
    gradients = []
    for _ in range(ITERATIONS):
        engine.run(1)
        gradients.append(engine.status("weights").gradient["weights.logits"].clone())
    params = {k: v.detach().clone() for k, v in engine.current_params().items()}
    return {"gradients": torch.stack(gradients), "params": params}


def main() -> None:
    rank, world, port, out, *methods = sys.argv[1:]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=int(rank), world_size=int(world))
    try:
        torch.save({m: run(m, True) for m in methods}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
