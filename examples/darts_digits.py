"""DARTS architecture search on sklearn's digits: learn which operation each layer uses.

Betty's DARTS example at CPU scale. The search network is a 1 -> 8 channel stem and two searched
layers on the 8 x 8 images; each searched layer is a softmax(alpha)-weighted sum of six candidate
operations (3x3 conv, 5x5 conv, 3x3 max pool, 3x3 average pool, identity, zero). The lower problem
trains the network's weights on training digits at the current alpha; the upper problem owns alpha
and minimizes the network's loss on validation digits, with the ``darts`` hypergradient (Liu et
al.'s finite-difference second-order term, ``darts_scale="lr"``: the paper's xi).

The architecture is read off as each layer's strongest operation other than zero (as in the
paper), retrained from scratch and compared with random architectures drawn from the same five
operations, each trained with the same optimizer, data and number of steps, on held-out test digits.

Run: ``python examples/darts_digits.py [--search-steps 300]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig

DEPENDENCIES = {"u2l": {"architecture": ["network"]}, "l2u": {"network": ["architecture"]}}
OPS = ("conv3x3", "conv5x5", "maxpool", "avgpool", "identity", "zero")
LAYERS, CHANNELS, BATCH = 2, 8, 64


def digit_images(seed: int = 0, valid_size: int = 500, test_size: int = 597):
    """Train, validation and test splits of the digits as (N, 1, 8, 8) images in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y[order])
    a, b = len(y) - valid_size - test_size, len(y) - test_size
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def batches(x: torch.Tensor, y: torch.Tensor, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled mini-batches of ``BATCH`` examples."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y) - BATCH + 1, BATCH):
            yield x[order[start : start + BATCH]], y[order[start : start + BATCH]]


def operation(name: str) -> nn.Module:
    """A candidate operation, ``CHANNELS`` -> ``CHANNELS`` channels at the same 8 x 8 resolution."""
    if name.startswith("conv"):
        k = int(name[4])
        return nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, k, padding=k // 2), nn.ReLU())
    return {"maxpool": nn.MaxPool2d(3, 1, 1), "avgpool": nn.AvgPool2d(3, 1, 1), "identity": nn.Identity()}.get(name) or Zero()


class Zero(nn.Module):
    """The 'no connection' operation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zeros shaped like ``x``."""
        return torch.zeros_like(x)


class SearchNetwork(nn.Module):
    """Stem, ``LAYERS`` mixed layers (every operation, weighted), linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, CHANNELS, 3, padding=1), nn.ReLU())
        self.layers = nn.ModuleList(nn.ModuleList(operation(o) for o in OPS) for _ in range(LAYERS))
        self.head = nn.Linear(CHANNELS * 64, 10)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Class scores with operation weights ``weights`` of shape ``(LAYERS, len(OPS))``."""
        h = self.stem(x)
        for ops, w in zip(self.layers, weights, strict=True):
            h = sum(wi * op(h) for wi, op in zip(w, ops, strict=True))
        return self.head(h.flatten(1))


class Alphas(nn.Module):
    """alpha: one logit per (layer, operation)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(1e-3 * torch.randn(LAYERS, len(OPS)))

    def forward(self) -> torch.Tensor:
        """The operation weights, softmax over each layer's operations."""
        return self.alpha.softmax(-1)


class Network(Problem):
    """Lower level: the search network's weights on training digits, at the current alpha."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.module(x, self.architecture()), y)


class Architecture(Problem):
    """Upper level: alpha, by the network's loss on validation digits."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.network(x, self.module()), y)


def problems(configs: Mapping[str, ProblemConfig], seed: int = 0) -> list[Problem]:
    """The two problems (the CLI experiment's factory)."""
    torch.manual_seed(seed)
    train, valid, _ = digit_images(seed)
    net, alphas = SearchNetwork(), Alphas()
    network = Network("network", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
                      data=batches(*train, seed), config=configs.get("network", ProblemConfig(hypergrad="darts")))
    architecture = Architecture("architecture", module=alphas, optimizer=torch.optim.Adam(alphas.parameters(), lr=3e-3),
                                data=batches(*valid, seed + 1), config=configs.get("architecture", ProblemConfig()))
    return [architecture, network]


def derived(alpha: torch.Tensor) -> list[str]:
    """Each layer's strongest operation other than zero (the paper's rule)."""
    keep = [i for i, o in enumerate(OPS) if o != "zero"]
    return [OPS[keep[int(row[keep].argmax())]] for row in alpha]


def train_architecture(choice: list[str], steps: int, seed: int) -> float:
    """Test accuracy of the discrete architecture ``choice``, trained from scratch on the training digits."""
    train, _, (xt, yt) = digit_images(seed)
    torch.manual_seed(seed)
    net = SearchNetwork()
    weights = torch.stack([F.one_hot(torch.tensor(OPS.index(c)), len(OPS)).float() for c in choice])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    stream = batches(*train, seed)
    for _ in range(steps):
        x, y = next(stream)
        optimizer.zero_grad()
        F.cross_entropy(net(x, weights), y).backward()
        optimizer.step()
    with torch.no_grad():
        return float((net(xt, weights).argmax(1) == yt).float().mean())


def run(search_steps: int = 300, train_steps: int = 300, seed: int = 0, random_architectures: int = 3) -> dict:
    """Search, then retrain the found architecture and random ones; their test accuracies."""
    made = problems({}, seed)
    engine = Engine(made, DEPENDENCIES, EngineConfig(train_iters=search_steps, seed=seed, log_every=5))
    engine.run()
    alpha = made[0].module.alpha.detach()
    found = derived(alpha)
    rng = np.random.default_rng(seed + 1)
    drawn = [[str(rng.choice(OPS[:-1])) for _ in range(LAYERS)] for _ in range(random_architectures)]
    return {
        "architecture": found,
        "weights": alpha.softmax(-1).tolist(),
        "darts_accuracy": train_architecture(found, train_steps, seed),
        "random": [(a, train_architecture(a, train_steps, seed)) for a in drawn],
        "history": engine.history,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search-steps", type=int, default=300)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    r = run(args.search_steps, args.train_steps, args.seed)
    print(f"digits, {args.search_steps} search steps (darts), each architecture retrained for {args.train_steps} steps")
    for layer, row in enumerate(r["weights"]):
        print(f"  layer {layer} weights: " + ", ".join(f"{o} {w:.2f}" for o, w in zip(OPS, row, strict=True)))
    print(f"  found {r['architecture']}: test accuracy {r['darts_accuracy']:.3f}")
    for arch, acc in r["random"]:
        print(f"  random {arch}: test accuracy {acc:.3f}")
    mean = sum(acc for _, acc in r["random"]) / len(r["random"])
    print(f"  found - mean of random architectures: {r['darts_accuracy'] - mean:+.3f}")
    return r


if __name__ == "__main__":
    main()
