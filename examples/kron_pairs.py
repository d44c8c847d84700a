"""Learn "are these two handwritten digits the same?" from x = kron(image_a, image_b), d = 4096.

Part 1 (`main`): the exact implicit trainer against dense SGD.
Part 2 (`learn_threshold`): a bilevel problem. The lower level fits a shifted-ReLU network whose first
layer is a `KroneckerLinear` (factored inputs and weights, never d-dimensional); the upper level learns
the shift b of the ReLU on held-out pairs, with hypergradients unrolled through the lower SGD steps.
The unroll is exact: the ReLU's second derivative is zero almost everywhere, so the only
second-order terms are the ones autograd already takes (through the piecewise-constant mask).

Pairs of sklearn digits (8 x 8 images, centred and scaled to unit norm) are Kronecker inputs: the
pair's features are all products of a pixel of one image with a pixel of the other. The two-layer
shifted-ReLU network is trained by `KronTwoLayerSGD`, which never builds the 4096-dimensional inputs,
and by dense SGD on the materialised inputs for comparison (same iterates, different cost).

Run: python examples/kron_pairs.py [--steps 600] [--bilevel-iters 150]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.backends.kron import DenseTwoLayerSGD, KronData, KroneckerLinear, KronTwoLayerSGD


def digit_pairs(
    n_train: int, n_test: int, seed: int = 0
) -> tuple[KronData, torch.Tensor, KronData, torch.Tensor]:
    """Balanced same/different pairs, train pairs from the first 1200 images and test pairs from the rest."""
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32)
    images = F.normalize(images - images.mean(0), dim=1)
    labels = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)

    def sample(pool: torch.Tensor, count: int) -> tuple[KronData, torch.Tensor]:
        a = pool[torch.randint(0, pool.numel(), (count,), generator=g)]
        b = pool[torch.randint(0, pool.numel(), (count,), generator=g)]
        same = torch.arange(count) % 2 == 0  # half the pairs: redraw b among images of a's digit
        for i in torch.nonzero(same).flatten().tolist():
            matches = pool[labels[pool] == labels[a[i]]]
            b[i] = matches[torch.randint(0, matches.numel(), (1,), generator=g)]
        y = (labels[a] == labels[b]).float() * 2 - 1
        return KronData(images[a], images[b]), y

    train, test = torch.arange(1200), torch.arange(1200, len(labels))
    return (*sample(train, n_train), *sample(test, n_test))


def main(steps: int = 600, m: int = 2048, batch: int = 16, lr: float = 40.0) -> dict:
    """Train on 2000 pairs, report test accuracy and time per step of ours and of dense SGD."""
    torch.manual_seed(0)
    train, y, test, y_test = digit_pairs(2000, 1000)
    layer = KroneckerLinear(64, 64, m, rank=4, bias=False, std=1.0)
    signs = (torch.randint(0, 2, (m,)) * 2 - 1).float()
    ours = KronTwoLayerSGD(train, y, layer, signs, lr=lr)
    dense = DenseTwoLayerSGD(train, y, layer, signs, lr=lr)
    schedule = torch.randint(0, train.n, (steps, batch), generator=torch.Generator().manual_seed(1))
    timing = {}
    for name, trainer in (("kron", ours), ("dense", dense)):
        start = time.perf_counter()
        for cols in schedule:
            trainer.step(cols)
        timing[name] = (time.perf_counter() - start) / steps
    accuracy = (torch.sign(ours.predict(test)) == y_test).float().mean().item()
    gap = (ours.predict(test) - dense.forward(test.materialize())).abs().max().item()
    print(f"pairs: d = {train.d}, m = {m}, {steps} steps of {batch}, threshold b = {ours.shift:.3f}")
    print(f"train loss {ours.full_loss().item():.4f}, test accuracy {accuracy:.3f} (chance 0.5)")
    print(f"ms per step: kron {timing['kron'] * 1e3:.2f}, dense {timing['dense'] * 1e3:.2f}")
    print(f"max |kron - dense| test prediction (float32): {gap:.2e}")
    return {"accuracy": accuracy, "gap": gap, **timing}


class PairNet(nn.Module):
    """f(u, v; b) = (1/sqrt(m)) sum_r a_r relu(<w_r, u ⊗ v> - b) with Kronecker-structured w_r."""

    def __init__(self, p: int, q: int, m: int, rank: int = 2) -> None:
        super().__init__()
        self.layer = KroneckerLinear(p, q, m, rank=rank, bias=False, std=1.0)
        self.register_buffer("signs", (torch.randint(0, 2, (m,)) * 2 - 1).float() / m**0.5)

    def forward(self, u: torch.Tensor, v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return F.relu(self.layer(u, v) - shift) @ self.signs


class Shift(nn.Module):
    """The threshold b, the upper level's only parameter."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))


class FitPairs(Problem):
    """Lower level: squared loss of the pair network on training pairs, at the upper level's shift."""

    def training_step(self, batch):
        u, v, y = batch
        return 0.5 * ((self.module(u, v, self.threshold.module.value) - y) ** 2).mean()


class Threshold(Problem):
    """Upper level: squared loss of the lower level's current network on held-out pairs."""

    def training_step(self, batch):
        u, v, y = batch
        return 0.5 * ((self.fit(u, v, self.module.value) - y) ** 2).mean()


def batches(data: KronData, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, ...]]:
    """Consecutive batches (u, v, y) of the pairs."""
    return [(data.U[i : i + size], data.V[i : i + size], y[i : i + size]) for i in range(0, data.n, size)]


def problems(
    configs: Mapping[str, ProblemConfig],
    m: int = 256,
    start: float = 1.5,
    lr: float = 5.0,
    seed: int = 0,
    threshold_lr: float = 0.05,
) -> list[Problem]:
    """The threshold (upper) and fit (lower) problems: the CLI experiment's factory and ``learn_threshold``'s.

    ``threshold_lr=0`` keeps b at ``start``: the same program with the upper level switched off.
    """
    torch.manual_seed(seed)
    train, y, valid, y_valid = digit_pairs(1024, 512, seed=seed)
    net, shift = PairNet(64, 64, m), Shift(start)
    fit = FitPairs(
        "fit",
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=lr),
        data=batches(train, y, 64),
        config=configs.get("fit", ProblemConfig(hypergrad="unroll", unroll_steps=5)),
    )
    threshold = Threshold(
        "threshold",
        module=shift,
        optimizer=torch.optim.Adam(shift.parameters(), lr=threshold_lr),
        data=batches(valid, y_valid, 128),
        config=configs.get("threshold", ProblemConfig()),
    )
    return [threshold, fit]


def train_pairs(
    iters: int = 150, m: int = 256, start: float = 1.5, lr: float = 5.0, seed: int = 0, threshold_lr: float = 0.05
) -> dict:
    """One bilevel run; returns the final b, held-out loss and accuracy, and the engine's history."""
    threshold, fit = problems({}, m, start, lr, seed, threshold_lr)
    _, _, valid, y_valid = digit_pairs(1024, 512, seed=seed)
    net, shift = fit.module, threshold.module
    engine = Engine(
        [threshold, fit],
        dependencies={"u2l": {threshold: [fit]}, "l2u": {fit: [threshold]}},
        config=EngineConfig(train_iters=iters, seed=seed),
    )
    engine.run()
    with torch.no_grad():
        out = net(valid.U, valid.V, shift.value)
        valid_loss = 0.5 * ((out - y_valid) ** 2).mean().item()
        accuracy = (torch.sign(out) == y_valid).float().mean().item()
    return {"shift": shift.value.item(), "valid_loss": valid_loss, "accuracy": accuracy, "history": engine.history}


def learn_threshold(
    iters: int = 150, m: int = 256, start: float = 1.5, lr: float = 5.0, seed: int = 0
) -> dict:
    """Learn b, and run the same program with b fixed at ``start`` (the baseline) for comparison.

    Returns the learned run's results with the baseline's under ``"baseline"``.
    """
    learned = train_pairs(iters, m, start, lr, seed)
    baseline = train_pairs(iters, m, start, lr, seed, threshold_lr=0.0)
    print(f"learned threshold b: {start:.3f} -> {learned['shift']:.3f}")
    for name, run in (("learned b", learned), (f"fixed b = {start}", baseline)):
        print(f"{name:>14}: held-out loss {run['valid_loss']:.4f}, held-out accuracy {run['accuracy']:.3f}")
    return {**learned, "baseline": baseline}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--bilevel-iters", type=int, default=150)
    args = parser.parse_args()
    main(args.steps)
    learn_threshold(args.bilevel_iters)
