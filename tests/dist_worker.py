"""One rank of the data-parallel tests: ``python dist_worker.py RANK WORLD PORT OUT SCENARIO...``.

Run by ``tests/test_distributed.py`` (world 2, gloo on 127.0.0.1) and imported by it for the one-process
reference (world 1). A digits MLP with learnable per-example weights (the weights are indexed by example id,
so every rank weights its own shard's examples) under a validation loss; 20 iterations per method. A
scenario is ``<method>``, ``<method>/3`` (three levels: a top problem learns the middle one's weight decay),
``<method>/masked`` (the validation examples of rank 1 carry weight 0, so its cotangent is exactly zero),
``<method>/adam`` (the lowest problem trains with Adam and weight decay, whose update is not affine in the gradient),
``<method>/betty`` (each rank solves its own system with its own gradient and the results are summed:
Betty's "average at the end") or ``policies`` (logs, progress, checkpoints and resume on two ranks). A scenario
followed by ``*n`` splits each rank's shard again into ``n`` micro-batches (``accumulate_steps=n``).
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

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


class MaskedValidation(Problem):
    def training_step(self, batch):
        x, y, mask = batch
        return (mask * F.cross_entropy(self.mlp(x), y, reduction="none")).mean()


class DecayedValidation(Problem):
    """The middle level of three: validation loss plus a weight decay on the example weights that ``top`` learns."""

    def training_step(self, batch):
        x, y = batch
        decay = 1e-3 * torch.exp(self.top.module.log_decay)
        return F.cross_entropy(self.mlp(x), y) + decay * (self.module.logits**2).sum()


class Test(Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.mlp(x), y)


class Logits(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n))


class LogDecay(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_decay = nn.Parameter(torch.zeros(()))


def build(scenario: str, distributed: bool, accumulate: int = 1, **engine: object) -> tuple[Engine, str]:
    """The program of ``scenario`` and the name of the problem whose gradient is compared; every problem
    splits its batches into ``accumulate`` micro-batches (``ProblemConfig.accumulate_steps``)."""
    method, _, variant = scenario.partition("/")
    x, y = load_digits(return_X_y=True)
    dtype = DTYPES.get(method, torch.float32)
    x, y = torch.tensor(x / 16.0, dtype=dtype), torch.tensor(y)
    train = [(x[i : i + 101], y[i : i + 101], torch.arange(i, i + 101)) for i in (0, 101, 202)]  # odd: unequal shards
    valid = [(x[400:499], y[400:499])]
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    mlp.to(dtype)
    weights = Logits(303).to(dtype)
    config = ProblemConfig(**CONFIGS[method], accumulate_steps=accumulate)
    plain = ProblemConfig(accumulate_steps=accumulate)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=0.01, weight_decay=1e-3) if variant == "adam" else torch.optim.SGD(mlp.parameters(), lr=0.3)
    lower = WeightedMLP("mlp", module=mlp, optimizer=optimizer, data=train, config=config)
    sgd = torch.optim.SGD(weights.parameters(), lr=10.0)
    settings = EngineConfig(**{"train_iters": ITERATIONS, "distributed": distributed, **engine})
    if variant == "masked":  # 50 / 49 shards: rank 0 holds the ones, rank 1 the zeros
        mask = (torch.arange(99) < 50).to(dtype)
        upper = MaskedValidation("weights", module=weights, optimizer=sgd, data=[(*valid[0], mask)], config=plain)
    elif variant == "3":
        decay = LogDecay().to(dtype)
        upper = DecayedValidation("weights", module=weights, optimizer=sgd, data=valid, config=config)
        # every second round, so that the lowest problem's steps read the middle one's updated weights first (with
        # unrolled middle and lowest levels, a top stepping every round would see no dependence on its parameter)
        top = Test("top", module=decay, optimizer=torch.optim.SGD(decay.parameters(), lr=1.0), data=[(x[500:599], y[500:599])],
                   config=replace(plain, step_every=2))
        deps = {"u2l": {top: [upper], upper: [lower]}, "l2u": {lower: [upper, top], upper: [top]}}
        return Engine([top, upper, lower], deps, settings), "top"
    else:
        upper = Validation("weights", module=weights, optimizer=sgd, data=valid, config=plain)
    built = Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, settings)
    if variant == "betty":
        betty_average(built, lower.name)
    return built, "weights"


def betty_average(engine: Engine, lower: str) -> None:
    """Betty's data parallel in this engine: each rank solves its own system, the step averages the results.

    No average where the losses read their parameters and no sums inside the pushes; each rank's vector
    and products are divided by its share, so the rank solves the system of its shard's mean loss (Betty's
    per-rank ``mean``), and its push, taken on its share-weighted loss, enters the step's sum over ranks
    weighted by its shard's size.
    """

    def mean(params: dict) -> dict:
        return {k: t / engine._setups[lower].stream.share for k, t in params.items()}

    engine._dist.averaged = lambda values: values
    engine._dist.matvec_wrap = lambda inner: lambda matvec: inner(lambda u: mean(matvec(u)))
    engine._dist.push_wrap = lambda inner: lambda push: lambda ctx: inner(push)(replace(ctx, v=mean(ctx.v)))


def run(scenario: str, distributed: bool, accumulate: int = 1) -> dict:
    """Upper gradients of every iteration and the final parameters of every problem."""
    engine, upper = build(scenario, distributed, accumulate)
    gradients = []
    for _ in range(ITERATIONS):
        engine.run(1)
        status = engine.status(upper)
        if status.steps > len(gradients):  # it stepped in this iteration
            gradients.append(torch.cat([g.reshape(-1).clone() for g in status.gradient.values()]))
    params = {k: v.detach().clone() for k, v in engine.current_params().items()}
    return {"gradients": torch.stack(gradients), "params": params}


def policies(out: Path, rank: int) -> dict:
    """Six iterations writing logs and checkpoints to rank-specific folders, then every rank resumes at 3."""
    mine = out / f"rank{rank}"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        engine, _ = build("cg", True, logger="csv", log_dir=str(mine / "logs"), log_every=1, progress=True,
                          checkpoint_every=3, checkpoint_dir=str(mine / "ckpt"), train_iters=6)
        engine.run()
    dist.barrier()  # rank 0's checkpoints are written
    resumed, _ = build("cg", True, train_iters=6, resume=str(out / "rank0" / "ckpt" / "ckpt-00000003.pt"))
    resumed.run()
    return {
        "files": sorted(str(p.relative_to(mine)) for p in mine.rglob("*") if p.is_file()),
        "progress": "betty_like" in stderr.getvalue(),
        "params": {k: v.detach().clone() for k, v in engine.current_params().items()},
        "resumed": {k: v.detach().clone() for k, v in resumed.current_params().items()},
    }


def on_ranks(scenario: str) -> dict:
    """``run`` under data parallel; ``<scenario>*n``: with ``n`` micro-batches per rank."""
    name, _, parts = scenario.partition("*")
    return run(name, True, int(parts or 1))


def main() -> None:
    rank, world, port, out, *scenarios = sys.argv[1:]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=int(rank), world_size=int(world),
        timeout=timedelta(seconds=120),  # a rank left waiting in a collective fails instead of hanging
    )
    try:
        results = {s: policies(Path(out).parent, int(rank)) if s == "policies" else on_ranks(s) for s in scenarios}
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
