"""Learn one L2 strength per parameter of a digits classifier on validation data (implicit differentiation).

Betty's hyperparameter-optimization example at CPU scale. The lower problem fits a logistic-regression
classifier on only 100 training digits, with the penalty ``0.5 * sum_j exp(h_j) * w_j**2``: one
strength for each of its 650 weights and biases. The upper problem owns the log-strengths ``h`` and
minimizes the classifier's loss on 300 validation digits; its gradient reaches ``h`` through the
classifier's solution by implicit differentiation (``cg``: the lower loss is strongly convex, so the
implicit function theorem holds at its minimum).

The baseline is what one does without a bilevel program: a grid search over one global L2 strength,
each value trained with the same optimizer and number of steps, the best picked on the same validation
digits. Both are scored on the remaining 1,397 test digits.

Run: ``python examples/hyperparameter_optimization.py [--outer-steps 150]``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig

DEPENDENCIES = {"u2l": {"strength": ["classifier"]}, "l2u": {"classifier": ["strength"]}}
INNER_LR = 1.0
START = math.log(1e-3)  # the initial log-strength of every parameter, and the middle of the grid


def digits_splits(seed: int = 0, train_size: int = 100, valid_size: int = 300):
    """Train, validation and test splits of sklearn's digits, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = torch.tensor(x[order] / 16.0, dtype=torch.float32), torch.tensor(y[order])
    cut = (train_size, train_size + valid_size)
    return (x[: cut[0]], y[: cut[0]]), (x[cut[0] : cut[1]], y[cut[0] : cut[1]]), (x[cut[1] :], y[cut[1] :])


class LogStrengths(nn.Module):
    """One log L2 strength per parameter of ``model``, in tensors of the same shapes."""

    def __init__(self, model: nn.Module, start: float = START) -> None:
        super().__init__()
        self.log = nn.ParameterList(nn.Parameter(torch.full_like(p, start)) for p in model.parameters())

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``0.5 * sum_j exp(h_j) * w_j**2`` over every parameter of ``model``."""
        return 0.5 * sum((h.exp() * w**2).sum() for h, w in zip(self.log, model.parameters(), strict=True))


class Classifier(Problem):
    """Lower level: cross-entropy on the training digits plus the per-parameter L2 penalty."""

    def training_step(self, batch):
        x, y = batch
        fit = F.cross_entropy(self.module(x), y)
        return {"loss": fit + self.strength.module.penalty(self.module), "train_ce": fit}


class Strength(Problem):
    """Upper level: the classifier's cross-entropy on validation digits."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)


def problems(configs: Mapping[str, ProblemConfig], seed: int = 0, inner_steps: int = 20, outer_lr: float = 0.1) -> list[Problem]:
    """The two problems (the CLI experiment's factory): full-batch GD below, Adam on the strengths above."""
    torch.manual_seed(seed)
    train, valid, _ = digits_splits(seed)
    model = nn.Linear(64, 10)
    strengths = LogStrengths(model)
    lower = configs.get("classifier", ProblemConfig(hypergrad="cg", unroll_steps=inner_steps, iterations=50))
    classifier = Classifier("classifier", module=model, optimizer=torch.optim.SGD(model.parameters(), lr=INNER_LR),
                            data=[train], config=lower)
    strength = Strength("strength", module=strengths, optimizer=torch.optim.Adam(strengths.parameters(), lr=outer_lr),
                        data=[valid], config=configs.get("strength", ProblemConfig()))
    return [strength, classifier]


def train_fixed(train, l2: float, steps: int, seed: int) -> nn.Module:
    """The baseline's inner loop: the same model, optimizer and steps, one global strength ``l2``."""
    torch.manual_seed(seed)
    model = nn.Linear(64, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    x, y = train
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * l2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        optimizer.step()
    return model


def scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        logits = model(x)
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def run(outer_steps: int = 150, inner_steps: int = 20, seed: int = 0, grid_points: int = 9) -> dict:
    """Learned per-parameter strengths against the best global strength of a grid; test scores of both."""
    train, valid, test = digits_splits(seed)
    steps = outer_steps * inner_steps
    grid = np.logspace(-5, -1, grid_points)
    searched = [(scores(train_fixed(train, float(l2), steps, seed), *valid)[0], float(l2)) for l2 in grid]
    best_valid, best_l2 = min(searched)
    baseline = train_fixed(train, best_l2, steps, seed)
    made = problems({}, seed, inner_steps)
    engine = Engine(made, DEPENDENCIES, EngineConfig(train_iters=steps, seed=seed, log_every=inner_steps))
    engine.run()
    strength, classifier = made
    learned = torch.cat([h.detach().flatten() for h in strength.module.log]).exp()
    return {
        "grid_l2": best_l2,
        "grid_valid_ce": best_valid,
        "grid_test": scores(baseline, *test),
        "learned_valid_ce": scores(classifier.module, *valid)[0],
        "learned_test": scores(classifier.module, *test),
        "learned_l2_quartiles": torch.quantile(learned, torch.tensor([0.25, 0.5, 0.75])).tolist(),
        "history": engine.history,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outer-steps", type=int, default=150)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    r = run(args.outer_steps, args.inner_steps, args.seed)
    print(f"digits, 100 training examples, {args.outer_steps} x {args.inner_steps} classifier steps")
    print(f"  grid search, one L2 strength ({r['grid_l2']:.1e}):  validation CE {r['grid_valid_ce']:.3f}, "
          f"test CE {r['grid_test'][0]:.3f}, test accuracy {r['grid_test'][1]:.3f}")
    print(f"  learned, 650 L2 strengths (cg):       validation CE {r['learned_valid_ce']:.3f}, "
          f"test CE {r['learned_test'][0]:.3f}, test accuracy {r['learned_test'][1]:.3f}")
    q = r["learned_l2_quartiles"]
    print(f"  learned strengths, quartiles: {q[0]:.1e} {q[1]:.1e} {q[2]:.1e}")
    return r


if __name__ == "__main__":
    main()
