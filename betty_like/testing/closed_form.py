"""Closed-form multilevel problems in float64 whose exact hypergradients come from ``torch.linalg.solve``.

Each builder returns a :class:`Bilevel` with a ready :class:`~betty_like.Engine` whose lower problems start at
their exact solutions, and the exact hypergradient of the upper problem (``case.exact``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig

DTYPE = torch.float64


def regression_data(n: int, d: int, seed: int, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DTYPE)
    w_true = torch.randn(d, generator=g, dtype=DTYPE)
    y = x @ w_true + noise * torch.randn(n, generator=g, dtype=DTYPE)
    return x, y


def linear(d: int, weight: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(d, 1, bias=False).to(DTYPE)
    if weight is not None:
        with torch.no_grad():
            layer.weight.copy_(weight.reshape(1, d))
    return layer


class Scalar(nn.Module):
    """A module holding one learnable tensor, returned by forward."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = nn.Parameter(value.clone().to(DTYPE))

    def forward(self) -> torch.Tensor:
        return self.value


# --------------------------------------------------------------------------- ridge: learn log lambda
class RidgeInner(Problem):
    def training_step(self, batch):
        x, y = batch
        residual = self.module(x).squeeze(-1) - y
        w = self.module.weight
        return 0.5 * (residual**2).mean() + 0.5 * torch.exp(self.penalty()) * (w**2).sum()


class ValidationLoss(Problem):
    """Upper loss: mean squared error of the lower problem named ``lower`` on held-out data."""

    lower_name = "inner"

    def training_step(self, batch):
        x, y = batch
        lower = getattr(self, self.lower_name)
        return 0.5 * ((lower(x).squeeze(-1) - y) ** 2).mean()


@dataclass
class Bilevel:
    engine: Engine
    exact: torch.Tensor
    upper: str
    lower: str


def _bilevel_engine(
    lower: Problem, upper_cls: type[Problem], upper_name: str, value: torch.Tensor, valid
) -> Engine:
    """Wire ``lower`` under an upper problem holding ``value`` (learning rate 0: it never moves)."""
    module = Scalar(value)
    upper = upper_cls(
        upper_name, module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.0), data=[valid]
    )
    return Engine(
        [upper, lower],
        dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        config=EngineConfig(train_iters=lower.config.unroll_steps),
    )


def ridge(
    method: str, *, unroll_steps: int = 1, lr: float | None = None, at_solution: bool = True, **config
) -> Bilevel:
    """Ridge regression learning log lambda; the inner problem starts at its exact solution."""
    d = 5
    x, y = regression_data(40, d, seed=0)
    xv, yv = regression_data(30, d, seed=1)
    log_lam = torch.tensor(-1.0, dtype=DTYPE)
    lam = torch.exp(log_lam)
    hessian = x.T @ x / len(x) + lam * torch.eye(d, dtype=DTYPE)
    w_star = torch.linalg.solve(hessian, x.T @ y / len(x))
    outer_grad_w = xv.T @ (xv @ w_star - yv) / len(xv)
    exact = -lam * w_star @ torch.linalg.solve(hessian, outer_grad_w)
    lipschitz = float(torch.linalg.eigvalsh(hessian).max())
    inner_module = linear(d, w_star if at_solution else torch.zeros(d, dtype=DTYPE))
    inner_opt_lr = lr if lr is not None else 1.0 / lipschitz
    inner = RidgeInner(
        "inner",
        module=inner_module,
        optimizer=torch.optim.SGD(inner_module.parameters(), lr=inner_opt_lr),
        data=[(x, y)],
        config=ProblemConfig(hypergrad=method, unroll_steps=unroll_steps, **config),
    )
    engine = _bilevel_engine(inner, ValidationLoss, "penalty", log_lam, (xv, yv))
    return Bilevel(engine, exact.reshape(()), "penalty", "inner")


# --------------------------------------------------------------------------- per-sample weights
class WeightedInner(Problem):
    def training_step(self, batch):
        x, y = batch
        weights = torch.sigmoid(self.weights())
        residual = self.module(x).squeeze(-1) - y
        return 0.5 * (weights * residual**2).mean() + 0.05 * (self.module.weight**2).sum()


class WeightsValidation(ValidationLoss):
    lower_name = "inner"


def sample_weights(
    method: str, *, optimizer: str = "sgd", unroll_steps: int = 1, at_solution: bool = True, **config
) -> Bilevel:
    """Noisy linear regression with one learnable weight logit per training sample."""
    n, d, rho = 24, 4, 0.1
    x, y = regression_data(n, d, seed=2)
    y = y.clone()
    y[:6] += 3.0  # corrupted targets
    xv, yv = regression_data(30, d, seed=3)
    logits = torch.linspace(-1.0, 1.0, n, dtype=DTYPE)
    s = torch.sigmoid(logits)
    hessian = x.T @ (s[:, None] * x) / n + rho * torch.eye(d, dtype=DTYPE)
    w_star = torch.linalg.solve(hessian, x.T @ (s * y) / n)
    outer_grad_w = xv.T @ (xv @ w_star - yv) / len(xv)
    q = torch.linalg.solve(hessian, outer_grad_w)
    residual = x @ w_star - y
    exact = -(s * (1 - s)) * residual * (x @ q) / n
    lipschitz = float(torch.linalg.eigvalsh(hessian).max())
    module = linear(d, w_star if at_solution else torch.zeros(d, dtype=DTYPE))
    optimizers = {
        "sgd": lambda p: torch.optim.SGD(p, lr=1.0 / lipschitz),
        "adam": lambda p: torch.optim.Adam(p, lr=0.05),
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    }
    opt = optimizers[optimizer](module.parameters())
    inner = WeightedInner(
        "inner",
        module=module,
        optimizer=opt,
        data=[(x, y)],
        config=ProblemConfig(hypergrad=method, unroll_steps=unroll_steps, **config),
    )
    engine = _bilevel_engine(inner, WeightsValidation, "weights", logits, (xv, yv))
    return Bilevel(engine, exact, "weights", "inner")


# --------------------------------------------------------------------------- three-level chain
class Pretrain(Problem):
    """Middle level: least squares with a per-coordinate ridge exp(lambda_j) set by the top level."""

    def training_step(self, batch):
        x, y = batch
        w = self.module.weight.squeeze(0)
        return (
            0.5 * ((self.module(x).squeeze(-1) - y) ** 2).mean()
            + 0.5 * (torch.exp(self.hyper()) * w**2).sum()
        )


class Finetune(Problem):
    """Lowest level: least squares on other data, pulled towards the pretrained weights."""

    rho = 0.5

    def training_step(self, batch):
        x, y = batch
        pull = self.module.weight - self.pretrain.module.weight
        return 0.5 * ((self.module(x).squeeze(-1) - y) ** 2).mean() + 0.5 * self.rho * (pull**2).sum()


class FinetuneValidation(ValidationLoss):
    lower_name = "finetune"


def chain(method: str, *, unroll_steps: int = 1, pretrain_method: str | None = None, **config) -> Bilevel:
    """hyper (top) -> pretrain (middle) -> finetune (bottom) -> validation loss read by the top.

    ``method`` is used by both lower levels unless ``pretrain_method`` sets the middle one apart.
    """
    d = 4
    x1, y1 = regression_data(30, d, seed=4)
    x2, y2 = regression_data(20, d, seed=5)
    xv, yv = regression_data(25, d, seed=6)
    lam = torch.linspace(-1.0, 0.5, d, dtype=DTYPE)
    h1 = x1.T @ x1 / len(x1) + torch.diag(torch.exp(lam))
    w1 = torch.linalg.solve(h1, x1.T @ y1 / len(x1))
    rho = Finetune.rho
    h2 = x2.T @ x2 / len(x2) + rho * torch.eye(d, dtype=DTYPE)
    w2 = torch.linalg.solve(h2, x2.T @ y2 / len(x2) + rho * w1)
    g2 = xv.T @ (xv @ w2 - yv) / len(xv)
    g1 = rho * torch.linalg.solve(h2, g2)
    exact = -torch.linalg.solve(h1, g1) * torch.exp(lam) * w1
    cfg = ProblemConfig(hypergrad=method, unroll_steps=unroll_steps, **config)
    pretrain_cfg = ProblemConfig(hypergrad=pretrain_method or method, unroll_steps=unroll_steps, **config)
    m1, m2 = linear(d, w1), linear(d, w2)
    lr1 = 1.0 / float(torch.linalg.eigvalsh(h1).max())
    lr2 = 1.0 / float(torch.linalg.eigvalsh(h2).max())
    pretrain = Pretrain(
        "pretrain",
        module=m1,
        optimizer=torch.optim.SGD(m1.parameters(), lr=lr1),
        data=[(x1, y1)],
        config=pretrain_cfg,
    )
    finetune = Finetune(
        "finetune", module=m2, optimizer=torch.optim.SGD(m2.parameters(), lr=lr2), data=[(x2, y2)], config=cfg
    )
    hyper_module = Scalar(lam)
    hyper = FinetuneValidation(
        "hyper",
        module=hyper_module,
        optimizer=torch.optim.SGD(hyper_module.parameters(), lr=0.0),
        data=[(xv, yv)],
    )
    engine = Engine(
        [hyper, pretrain, finetune],
        dependencies={"u2l": {hyper: [pretrain], pretrain: [finetune]}, "l2u": {finetune: [hyper]}},
        config=EngineConfig(train_iters=unroll_steps),
    )
    return Bilevel(engine, exact, "hyper", "finetune")
