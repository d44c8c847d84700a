"""Implicit MAML on few-shot sinusoid regression, a batch of tasks adapted at once with ``torch.func.vmap``.

Betty's implicit-MAML example at CPU scale. A task is ``y = A sin(x - phase)`` with A in [0.1, 5] and
phase in [0, pi], seen through 10 support and 10 query points on [-5, 5]. The upper problem owns the
meta-initialization theta of a 1-40-40-1 MLP. The lower problem holds one adapted copy phi_t of the
MLP per task of a meta-batch, stacked along a leading task dimension, and minimizes

    sum_t  support_mse_t(phi_t) + (lam / 2) * ||phi_t - theta||^2

with the MLP evaluated on every task at once by ``torch.func.vmap``. At the start of each meta-batch
a callback resets phi_t to theta (Betty's ``on_inner_loop_start``). The upper loss is the mean query
MSE at phi; its gradient reaches theta through the adapted weights by implicit differentiation
(``cg``), never through the inner optimizer's steps.

The baseline adapts from a random initialization (the meta-initialization before training) with the
same proximal steps; both are scored on 200 new tasks.

Run: ``python examples/imaml_sinusoid.py [--meta-steps 300]``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.func import vmap

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.callbacks import Callback

DEPENDENCIES = {"u2l": {"meta": ["adapt"]}, "l2u": {"adapt": ["meta"]}}
SHAPES = {"w1": (1, 40), "b1": (40,), "w2": (40, 40), "b2": (40,), "w3": (40, 1), "b3": (1,)}
LAM = 0.5  # proximal strength: how far an adapted copy may move from theta
INNER_LR = 0.02


def mlp(params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The 1-40-40-1 ReLU network of one task, as a function of its parameters (vmapped over tasks)."""
    h = torch.relu(x @ params["w1"] + params["b1"])
    h = torch.relu(h @ params["w2"] + params["b2"])
    return h @ params["w3"] + params["b3"]


def sample_tasks(count: int, shots: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``count`` tasks: support ``(xs, ys)`` and query ``(xq, yq)``, each of shape ``(count, shots, 1)``."""
    amplitude = 0.1 + 4.9 * torch.rand(count, 1, 1, generator=generator)
    phase = math.pi * torch.rand(count, 1, 1, generator=generator)
    x = 10 * torch.rand(count, 2 * shots, 1, generator=generator) - 5
    y = amplitude * torch.sin(x - phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def task_batches(tasks: int, shots: int, inner_steps: int, seed: int, part: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Meta-batches of tasks: the support sets, each repeated for ``inner_steps`` lower steps (``part="support"``),
    or the query sets of the same tasks, once each (``part="query"``)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        xs, ys, xq, yq = sample_tasks(tasks, shots, generator)
        if part == "support":
            yield from [(xs, ys)] * inner_steps
        else:
            yield xq, yq


class MetaInit(nn.Module):
    """theta: the initialization every task adapts from."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.ParameterDict()
        for name, shape in SHAPES.items():
            fan_in = shape[0] if len(shape) == 2 else 40
            self.theta[name] = nn.Parameter(torch.randn(shape) / math.sqrt(fan_in) if len(shape) == 2 else torch.zeros(shape))


class TaskWeights(nn.Module):
    """phi: one copy of the MLP's parameters per task, stacked along dimension 0."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.phi = nn.ParameterDict({n: nn.Parameter(torch.zeros(tasks, *s)) for n, s in SHAPES.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every task's prediction on its own inputs ``x`` of shape ``(tasks, points, 1)``."""
        return vmap(mlp)(dict(self.phi), x)


class Adapt(Problem):
    """Lower level: every task's support MSE plus the proximal pull towards theta."""

    def training_step(self, batch):
        x, y = batch
        mse = ((self.module(x) - y) ** 2).mean(dim=(1, 2))  # one value per task
        theta = self.meta.module.theta
        pull = sum(((phi - theta[n]) ** 2).sum() for n, phi in self.module.phi.items())
        return {"loss": mse.sum() + 0.5 * LAM * pull, "support_mse": mse.mean()}


class Meta(Problem):
    """Upper level: the mean query MSE of the adapted copies."""

    def training_step(self, batch):
        x, y = batch
        return ((self.adapt(x) - y) ** 2).mean()


class ResetToTheta(Callback):
    """Start every meta-batch's adaptation at theta (what Betty's iMAML does in ``on_inner_loop_start``)."""

    def __init__(self, inner_steps: int) -> None:
        self.inner_steps = inner_steps

    def on_step_start(self, engine: Engine, name: str) -> None:
        """Before the first lower step of each meta-batch, copy theta into every task's weights."""
        if name == "adapt" and engine.status("adapt").steps % self.inner_steps == 0:
            adapt, meta = engine.problems["adapt"].module, engine.problems["meta"].module
            with torch.no_grad():
                for n, phi in adapt.phi.items():
                    phi.copy_(meta.theta[n].expand_as(phi))


def problems(configs: Mapping[str, ProblemConfig], seed: int = 0, tasks: int = 16, shots: int = 10, inner_steps: int = 10) -> list[Problem]:
    """The two problems (the CLI experiment's factory). The lower config's ``unroll_steps`` must be ``inner_steps``."""
    torch.manual_seed(seed)
    theta, phi = MetaInit(), TaskWeights(tasks)
    lower = configs.get("adapt", ProblemConfig(hypergrad="cg", unroll_steps=inner_steps, iterations=10, on_solver_failure="warn"))
    if lower.unroll_steps != inner_steps:
        raise ValueError(f"problem 'adapt': unroll_steps={lower.unroll_steps} must equal inner_steps={inner_steps}, "
                         "the lower steps taken on each meta-batch; set both to the same value")
    adapt = Adapt("adapt", module=phi, optimizer=torch.optim.SGD(phi.parameters(), lr=INNER_LR),
                  data=task_batches(tasks, shots, inner_steps, seed, "support"), config=lower)
    meta = Meta("meta", module=theta, optimizer=torch.optim.Adam(theta.parameters(), lr=3e-3),
                data=task_batches(tasks, shots, inner_steps, seed, "query"), config=configs.get("meta", ProblemConfig()))
    return [meta, adapt]


def adapted_query_mse(theta: Mapping[str, torch.Tensor], tasks: tuple[torch.Tensor, ...], steps: int) -> float:
    """Mean query MSE after ``steps`` proximal SGD steps from ``theta`` on each task's support set."""
    xs, ys, xq, yq = tasks
    phi = {n: t.detach().expand(len(xs), *t.shape).clone().requires_grad_() for n, t in theta.items()}
    for _ in range(steps):
        loss = ((vmap(mlp)(phi, xs) - ys) ** 2).mean(dim=(1, 2)).sum()
        loss = loss + 0.5 * LAM * sum(((phi[n] - theta[n].detach()) ** 2).sum() for n in phi)
        grads = torch.autograd.grad(loss, list(phi.values()))
        phi = {n: (p - INNER_LR * g).detach().requires_grad_() for (n, p), g in zip(phi.items(), grads, strict=True)}
    with torch.no_grad():
        return float(((vmap(mlp)(phi, xq) - yq) ** 2).mean())


def run(meta_steps: int = 300, inner_steps: int = 10, seed: int = 0, test_tasks: int = 200) -> dict:
    """Meta-train theta; query MSE on new tasks after adapting from theta, from the random start, and not at all."""
    made = problems({}, seed, inner_steps=inner_steps)
    meta = made[0]
    start = {n: t.detach().clone() for n, t in meta.module.theta.items()}
    engine = Engine(made, DEPENDENCIES, EngineConfig(train_iters=meta_steps * inner_steps, seed=seed, log_every=inner_steps),
                    callbacks=[ResetToTheta(inner_steps)])
    engine.run()
    test = sample_tasks(test_tasks, 10, torch.Generator().manual_seed(seed + 10_000))
    learned = dict(meta.module.theta)
    return {
        "random_init_mse": adapted_query_mse(start, test, inner_steps),
        "meta_init_mse": adapted_query_mse(learned, test, inner_steps),
        "meta_init_unadapted_mse": adapted_query_mse(learned, test, 0),
        "zero_predictor_mse": float((test[3] ** 2).mean()),
        "history": engine.history,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-steps", type=int, default=300)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    r = run(args.meta_steps, args.inner_steps, args.seed)
    print(f"sinusoid regression, 10-shot, {args.meta_steps} meta-steps of 16 tasks, {args.inner_steps} adaptation steps")
    print(f"  query MSE on 200 new tasks, predicting 0:          {r['zero_predictor_mse']:.3f}")
    print(f"  adapted from a random initialization (baseline):  {r['random_init_mse']:.3f}")
    print(f"  adapted from the learned initialization (iMAML):  {r['meta_init_mse']:.3f}")
    print(f"  learned initialization, not adapted:              {r['meta_init_unadapted_mse']:.3f}")
    return r


if __name__ == "__main__":
    main()
