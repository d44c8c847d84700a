"""Learning to reweight noisy training examples on sklearn's digits (Meta-Weight-Net style).

40% of the training labels are flipped to a wrong class. A small classifier (the *lower* problem)
trains on them with a per-example weighted loss; the weights come from a tiny network that maps an
example's loss to a weight in (0, 1) (the *upper* problem). The upper problem is trained on a small
clean validation split: its loss is the classifier's validation loss, whose gradient reaches the
weight network *through* the classifier's training step, by the lower problem's hypergradient method
(by default: reverse mode through one differentiable SGD step, as Meta-Weight-Net does).

The script trains the same classifier twice with the same optimizer, data and number of steps, once
plainly and once reweighted, and prints both test accuracies. Run it with ``make demo`` or
``python examples/reweight_digits.py --help``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig


# --------------------------------------------------------------------------- data
def noisy_digits(noise: float, seed: int, valid_size: int = 100, test_size: int = 500):
    """Train (noisy labels), clean validation and clean test splits, as float32 tensors."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x, y = torch.tensor(x[order] / 16.0, dtype=torch.float32), torch.tensor(y[order])
    test, valid, train = (
        slice(0, test_size),
        slice(test_size, test_size + valid_size),
        slice(test_size + valid_size, None),
    )
    y_train = y[train].clone()
    flip = torch.tensor(rng.random(len(y_train)) < noise)
    # a flipped label becomes a uniformly chosen *different* class
    y_train[flip] = (y_train[flip] + torch.tensor(rng.integers(1, 10, int(flip.sum())))) % 10
    return (x[train], y_train, flip), (x[valid], y[valid]), (x[test], y[test])


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
    """An endless stream of shuffled mini-batches (an infinite generator, which the engine accepts)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield x[index], y[index]


def train_batches(noise: float, seed: int, batch_size: int):
    """The noisy training stream (the CLI experiment's ``build.classifier.data``)."""
    (x, y, _), _, _ = noisy_digits(noise, seed)
    return shuffled_batches(x, y, batch_size, seed)


def valid_batches(noise: float, seed: int) -> list:
    """The clean validation split as one batch (the CLI experiment's ``build.reweight.data``)."""
    return [noisy_digits(noise, seed)[1]]


def classifier() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


class TracksTestAccuracy:
    """A ``validation_step`` for a classifier problem: accuracy on ``self.test`` and the best so far.

    What Betty's example engines do in their ``validation`` hook; the ported examples mix it into the
    problem that holds the classifier (which sets ``test``, ``verbose``, ``validations``, ``best_acc``).
    """

    def validation_step(self):
        x, y = self.test
        acc = accuracy(self.module, x, y)
        self.best_acc = max(self.best_acc, acc)
        self.validations += 1
        if self.verbose:
            print(f"    [validation {self.validations}] test acc {acc:.3f} (best {self.best_acc:.3f})")
        return {"acc": acc, "best_acc": self.best_acc}


# --------------------------------------------------------------------------- the two levels
class Classifier(Problem):
    """Lower level: weighted cross-entropy on the noisy training labels."""

    def training_step(self, batch):
        x, y = batch
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        # the weight network sees each example's loss (as a constant input) and returns its weight
        weights = self.reweight(losses.detach().unsqueeze(1)).squeeze(1)
        return (weights * losses).sum() / (weights.sum() + 1e-8)


class Reweight(Problem):
    """Upper level: the classifier's loss on clean validation data."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)


def weight_network() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())


# --------------------------------------------------------------------------- training
def train_plain(train, steps: int, lr: float, batch_size: int, seed: int) -> nn.Module:
    """The baseline: the same classifier, optimizer, batches and number of steps, every example weighted 1."""
    torch.manual_seed(seed)
    model = classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batches = shuffled_batches(train[0], train[1], batch_size, seed)
    for _ in range(steps):
        x, y = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def train_reweighted(train, valid, steps: int, lr: float, batch_size: int, seed: int, method: str):
    torch.manual_seed(seed)
    model, weights = classifier(), weight_network()
    inner = Classifier(
        "classifier",
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
        data=shuffled_batches(train[0], train[1], batch_size, seed),
        config=ProblemConfig(hypergrad=method, unroll_steps=1),
    )
    outer = Reweight(
        "reweight",
        module=weights,
        optimizer=torch.optim.Adam(weights.parameters(), lr=1e-3, weight_decay=1e-4),
        data=[valid],
    )
    engine = Engine(
        [outer, inner],
        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        config=EngineConfig(train_iters=steps, seed=seed),
    )
    engine.run()
    return model, weights, engine.history


def run(
    steps: int = 1500,
    seed: int = 0,
    noise: float = 0.4,
    method: str = "unroll",
    lr: float = 0.1,
    batch_size: int = 100,
) -> dict:
    """Train plainly and with learned reweighting; test accuracies, learned weights, the engine's loss history."""
    train, valid, test = noisy_digits(noise, seed)
    start = time.perf_counter()
    plain = train_plain(train, steps, lr, batch_size, seed)
    plain_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model, weights, history = train_reweighted(train, valid, steps, lr, batch_size, seed, method)
    reweighted_seconds = time.perf_counter() - start
    with torch.no_grad():
        x, y, flipped = train
        example_weights = weights(F.cross_entropy(model(x), y, reduction="none").unsqueeze(1)).squeeze(1)
    return {
        "plain_accuracy": accuracy(plain, *test),
        "reweighted_accuracy": accuracy(model, *test),
        "weight_clean": float(example_weights[~flipped].mean()),
        "weight_corrupted": float(example_weights[flipped].mean()),
        "plain_seconds": plain_seconds,
        "reweighted_seconds": reweighted_seconds,
        "history": history,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="inner (classifier) steps for both runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.4, help="fraction of training labels flipped")
    parser.add_argument("--method", default="unroll", help="hypergradient method of the classifier problem")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    r = run(args.steps, args.seed, args.noise, args.method)
    print(f"digits, {args.noise:.0%} of training labels flipped, {args.steps} steps, method={args.method}")
    print(f"  plain training:       test accuracy {r['plain_accuracy']:.3f}  ({r['plain_seconds']:.1f} s)")
    print(
        f"  learned reweighting:  test accuracy {r['reweighted_accuracy']:.3f}  ({r['reweighted_seconds']:.1f} s)"
    )
    print(f"  difference:           {r['reweighted_accuracy'] - r['plain_accuracy']:+.3f}")
    print(
        f"  mean learned weight:  clean examples {r['weight_clean']:.3f}, corrupted {r['weight_corrupted']:.3f}"
    )
    return r


if __name__ == "__main__":
    main()
