"""Learn "are these two handwritten digits the same?" from x = kron(image_a, image_b), d = 4096.

Pairs of sklearn digits (8 x 8 images, centred and scaled to unit norm) are Kronecker inputs: the
pair's features are all products of a pixel of one image with a pixel of the other. The two-layer
shifted-ReLU network is trained by `KronTwoLayerSGD`, which never builds the 4096-dimensional inputs,
and by dense SGD on the materialised inputs for comparison (same iterates, different cost).

Run: python examples/kron_pairs.py [--steps 1500]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from betty_like.backends.kron import DenseTwoLayerSGD, KronData, KroneckerLinear, KronTwoLayerSGD


def digit_pairs(n_train: int, n_test: int, seed: int = 0) -> tuple[KronData, torch.Tensor, KronData, torch.Tensor]:
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


def main(steps: int = 1500, m: int = 2048, batch: int = 16, lr: float = 40.0) -> dict:
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    main(parser.parse_args().steps)
