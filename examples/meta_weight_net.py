"""Meta-Weight-Net on sklearn's digits: a CPU-scale port of Betty's ``learning_to_reweight`` example.

Betty ships Meta-Weight-Net (Shu et al., 2019) as ``examples/learning_to_reweight``: a ResNet-32
classifier trained on long-tailed or label-corrupted CIFAR, each example's loss multiplied by a
weight that a one-hidden-layer network computes *from that loss*. This script keeps its structure
(problem names, graph, losses, optimizers, schedule and hypergradient method) and shrinks the rest:
an MLP on the 8x8 digits instead of ResNet-32 on CIFAR, a few hundred steps instead of 15,000.

Two problems, wired exactly as in Betty::

    inner  (lower)  classifier; loss = mean_i  outer(l_i) * l_i   on the corrupted training set,
                    where l_i is example i's cross-entropy (fed to the weight net as a constant)
    outer  (upper)  weight net (1 -> 100 -> 1, sigmoid); loss = classifier's cross-entropy on a small,
                    clean, class-balanced meta set

    dependencies = {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}

``u2l``: the weight net's parameters appear in ``inner``'s loss; ``l2u``: ``outer``'s loss reads
``inner``'s current solution, so ``outer``'s gradient is a hypergradient through ``inner``'s training
step, by ``inner``'s method (``--method``; Betty's example uses ``darts``, one inner step per outer step).

The data follow Betty's ``build_dataloader``: a meta set of ``--num_meta`` examples taken evenly from
every class, the rest of the training pool optionally made long-tailed (``--imbalanced_factor``: the
largest class is that many times the smallest) and its labels optionally corrupted
(``--corruption_type`` uniform / flip1 / flip2 with ``--corruption_ratio``). The default is the
setting of Betty's second README command (40% uniform corruption, meta_lr 1e-3, meta weight decay 1e-4).

Betty's inner loss is the plain mean of weighted losses, so raising every weight acts like a larger
learning rate. On digits that is mostly what the outer problem learns: the weight rises with the loss
(``darts``) or is flat (``unroll``), corrupted labels are not singled out, and the final accuracy is
the baseline's. The original Meta-Weight-Net code divides by the sum of the weights in the batch;
``--normalize`` does that, and with ``--method unroll`` (the original's one differentiable step) or
``neumann`` the classifier stops memorising the corrupted labels (final test accuracy 0.95 against
0.82 for the baseline, seed 1). With ``--normalize`` and ``darts`` the weights collapse and the
classifier diverges. ``darts`` and ``sama`` are finite differences in the classifier's weights, so
they also differentiate through the ``detach()`` that makes each loss a constant input of the weight
net, which unroll and the implicit methods respect: they estimate a different mixed derivative here.

Run ``python examples/meta_weight_net.py --help``; ``main(argv)`` returns the numbers as a dict.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reweight_digits import TracksTestAccuracy, accuracy, classifier, shuffled_batches  # noqa: E402

NUM_CLASSES = 10
METHODS = ["unroll", "first_order", "darts", "sama", "neumann", "cg", "fixed_point"]
# Linear-solver budget for the implicit methods: Betty runs 1 iteration of neumann/cg by default;
# a handful keeps this example at CPU scale while letting the solve make progress.
SOLVER = {"iterations": 5, "damping": 0.1}


# --------------------------------------------------------------------------- data (Betty's build_dataloader)
def corruption_matrix(kind: str, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Row c: the distribution of the observed label of an example of true class c."""
    eye = np.eye(NUM_CLASSES)
    if kind == "uniform":  # keep the label with 1 - ratio, else draw any class (the true one included)
        return eye * (1 - ratio) + np.full((NUM_CLASSES, NUM_CLASSES), ratio / NUM_CLASSES)
    matrix = eye * (1 - ratio)
    moves = {"flip1": 1, "flip2": 2}[kind]  # each class flips to one (or two) fixed other classes
    for c in range(NUM_CLASSES):
        others = rng.choice([k for k in range(NUM_CLASSES) if k != c], moves, replace=False)
        matrix[c, others] = ratio / moves
    return matrix


def meta_weight_digits(
    seed: int,
    num_meta: int = 100,
    test_size: int = 500,
    imbalanced_factor: float | None = None,
    corruption_type: str | None = None,
    corruption_ratio: float = 0.0,
):
    """Training (possibly long-tailed and corrupted), clean balanced meta, and clean test splits.

    Returns ``(x, y, y_true)``, ``(x, y)``, ``(x, y)`` as float32 / int64 tensors, and the per-class
    training counts.
    """
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    test, pool = order[:test_size], order[test_size:]
    meta, train = [], []
    per_class_meta = num_meta // NUM_CLASSES
    available = min(int((y[pool] == c).sum()) for c in range(NUM_CLASSES)) - per_class_meta
    if imbalanced_factor is not None:
        # class c keeps available / factor^(c/9) examples; which class is rarest is shuffled, as in Betty
        counts = [int(available / imbalanced_factor ** (c / (NUM_CLASSES - 1))) for c in range(NUM_CLASSES)]
        rng.shuffle(counts)
    else:
        counts = [None] * NUM_CLASSES
    for c in range(NUM_CLASSES):
        members = pool[y[pool] == c]
        meta.extend(members[:per_class_meta])
        train.extend(members[per_class_meta:][: counts[c]])
    train = np.array(train)
    y_true = y[train]
    y_observed = y_true.copy()
    if corruption_type is not None and corruption_ratio > 0:
        matrix = corruption_matrix(corruption_type, corruption_ratio, rng)
        y_observed = np.array([rng.choice(NUM_CLASSES, p=matrix[c]) for c in y_true])

    def tensors(index, labels):
        return torch.tensor(x[index], dtype=torch.float32), torch.tensor(labels)

    train_split = (*tensors(train, y_observed), torch.tensor(y_true))
    class_counts = [int((y_true == c).sum()) for c in range(NUM_CLASSES)]
    return train_split, tensors(np.array(meta), y[meta]), tensors(test, y[test]), class_counts


# --------------------------------------------------------------------------- the two problems
class Inner(TracksTestAccuracy, Problem):
    """Lower level: the classifier, its per-example losses weighted by the weight net."""

    def __init__(self, *args, test=None, verbose: bool = False, normalize: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.normalize = normalize
        self.test, self.verbose, self.validations, self.best_acc = test, verbose, 0, 0.0

    def training_step(self, batch):
        x, y = batch
        losses = F.cross_entropy(self.module(x), y, reduction="none").unsqueeze(1)
        weights = self.outer(losses.detach())  # loss -> weight; the loss itself is an input, not a path
        if self.normalize:
            return (weights * losses).sum() / (weights.sum() + 1e-8)
        return (weights * losses).mean()


class Outer(Problem):
    """Upper level: the weight net, judged by the classifier's loss on the clean meta set."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.inner(x), y)


class WeightNet(nn.Module):
    """Betty's meta-weight ``MLP``: loss (one number) -> ReLU hidden layers -> weight in (0, 1)."""

    def __init__(self, hidden_size: int = 100, num_layers: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(1, hidden_size), nn.ReLU()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_size, hidden_size), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden_size, 1), nn.Sigmoid())

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return self.net(loss)


# --------------------------------------------------------------------------- training
def lower_config(method: str) -> ProblemConfig:
    """``inner``'s config: Betty's ``Config(type=method, unroll_steps=1)``, with a CPU-sized solver budget.

    Betty's darts is unscaled (``darts_scale="identity"`` in the new engine); ours is left at the
    default (each parameter group's learning rate, DARTS' xi). ``outer`` steps with Adam, which is
    nearly invariant to a constant factor on its gradient, so the choice hardly matters here. For the
    implicit methods the solver gets a small budget; an unconverged solve is accepted (Betty's are one
    iteration long) where this version of betty_like has a setting for it.
    """
    if method not in ("neumann", "cg", "fixed_point"):
        return ProblemConfig(hypergrad=method, unroll_steps=1)
    return ProblemConfig(hypergrad=method, unroll_steps=1, **SOLVER)


def make_inner_optimizer(model: nn.Module, args) -> tuple[torch.optim.Optimizer, object]:
    """Betty's inner optimizer and schedule: SGD(0.1, momentum 0.9, wd 5e-4), lr x0.1 at 2/3 and 13/15 of training."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    milestones = [args.iters * 10 // 15, args.iters * 13 // 15]
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def train_baseline(train, test, args, valid_every: int) -> tuple[nn.Module, float]:
    """Betty's ``--baseline``: the same classifier, optimizer, schedule and batches, every weight 1."""
    torch.manual_seed(args.seed)
    model = classifier()
    optimizer, scheduler = make_inner_optimizer(model, args)
    batches = shuffled_batches(train[0], train[1], args.batch_size, args.seed)
    best = 0.0
    for step in range(1, args.iters + 1):
        x, y = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        if step % valid_every == 0:
            best = max(best, accuracy(model, *test))
    return model, best


def make_problems(train, meta, test, args, configs: Mapping[str, ProblemConfig]) -> list[Problem]:
    """The outer (weight net) and inner (classifier) problems with the script's settings."""
    torch.manual_seed(args.seed)
    model = classifier()
    weight_net = WeightNet(args.meta_net_hidden_size, args.meta_net_num_layers)
    optimizer, scheduler = make_inner_optimizer(model, args)
    inner = Inner(
        "inner",
        module=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=shuffled_batches(train[0], train[1], args.batch_size, args.seed),
        config=configs.get("inner", lower_config(args.method)),
        test=test,
        verbose=args.verbose,
        normalize=args.normalize,
    )
    outer = Outer(
        "outer",
        module=weight_net,
        optimizer=torch.optim.Adam(
            weight_net.parameters(), lr=args.meta_lr, weight_decay=args.meta_weight_decay
        ),
        data=shuffled_batches(meta[0], meta[1], args.batch_size, args.seed + 1),
        config=configs.get("outer", ProblemConfig()),
    )
    return [outer, inner]


def problems(configs: Mapping[str, ProblemConfig], argv: Sequence[str] = ()) -> list[Problem]:
    """The CLI experiment's factory: the two problems with the settings ``argv`` gives the script."""
    args = parse_args([str(a) for a in argv])  # YAML turns "20" into 20
    train, meta, test, _ = splits(args)
    return make_problems(train, meta, test, args, configs)


def splits(args):
    """Training (corrupted, possibly imbalanced), clean meta and test splits, and the class counts."""
    corruption = None if args.corruption_type == "none" else args.corruption_type
    return meta_weight_digits(args.seed, args.num_meta, 500, args.imbalanced_factor, corruption, args.corruption_ratio)


def train_meta_weight_net(train, meta, test, args, valid_every: int):
    outer, inner = make_problems(train, meta, test, args, {})
    weight_net, model = outer.module, inner.module
    initial = [p.detach().clone() for p in weight_net.parameters()]
    engine = Engine(
        [outer, inner],
        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        config=EngineConfig(train_iters=args.iters, valid_every=valid_every, seed=args.seed),
    )
    engine.run()
    moved = (
        sum(
            float((p.detach() - q).norm() ** 2) for p, q in zip(weight_net.parameters(), initial, strict=True)
        )
        ** 0.5
    )
    return engine, model, weight_net, inner.best_acc, moved


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--iters", type=int, default=1500, help="engine iterations (inner steps; outer steps too)"
    )
    parser.add_argument(
        "--method",
        default="darts",
        choices=METHODS,
        help="hypergradient method of the inner problem (Betty's example: darts)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--meta_lr", type=float, default=1e-3)
    parser.add_argument("--meta_weight_decay", type=float, default=1e-4)
    parser.add_argument("--meta_net_hidden_size", type=int, default=100)
    parser.add_argument("--meta_net_num_layers", type=int, default=1)
    parser.add_argument(
        "--num_meta", type=int, default=100, help="clean meta examples, evenly over the classes"
    )
    parser.add_argument("--imbalanced_factor", type=float, default=None, help="largest / smallest class size")
    parser.add_argument("--corruption_type", default="uniform", choices=["uniform", "flip1", "flip2", "none"])
    parser.add_argument("--corruption_ratio", type=float, default=0.4)
    parser.add_argument("--valid_points", type=int, default=10, help="test-accuracy checks during training")
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="divide by the batch's weight sum (original MWN), not by its size",
    )
    parser.add_argument("--verbose", action="store_true", help="print every validation point")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    """Run the baseline and Meta-Weight-Net, print a summary, return the numbers."""
    args = parse_args(argv)
    corruption = None if args.corruption_type == "none" else args.corruption_type
    train, meta, test, counts = splits(args)
    valid_every = max(1, args.iters // args.valid_points)
    x_train, y_train, y_true = train
    corrupted = y_train != y_true
    print(
        f"meta-weight-net on digits: {len(y_train)} training examples (per class {counts}), "
        f"{float(corrupted.float().mean()):.0%} labels corrupted ({corruption or 'none'}), {len(meta[1])} meta, "
        f"{len(test[1])} test; method={args.method}, {args.iters} iterations"
    )

    print("[1/2] baseline: plain training on the same batches")
    start = time.perf_counter()
    plain, plain_best = train_baseline(train, test, args, valid_every)
    plain_seconds = time.perf_counter() - start
    plain_acc = accuracy(plain, *test)
    print(f"      test acc {plain_acc:.3f} (best {plain_best:.3f}) in {plain_seconds:.1f} s")

    print("[2/2] meta-weight-net: inner (classifier) <-> outer (weight net)")
    start = time.perf_counter()
    engine, model, weight_net, mwn_best, moved = train_meta_weight_net(train, meta, test, args, valid_every)
    mwn_seconds = time.perf_counter() - start
    mwn_acc = accuracy(model, *test)
    losses = {
        name: [h["loss"] for h in engine.history if h["problem"] == name] for name in ("inner", "outer")
    }
    print(f"      test acc {mwn_acc:.3f} (best {mwn_best:.3f}) in {mwn_seconds:.1f} s")

    with torch.no_grad():
        example_losses = F.cross_entropy(model(x_train), y_train, reduction="none").unsqueeze(1)
        weights = weight_net(example_losses).squeeze(1)
        curve = weight_net(torch.linspace(0, 5, 6).unsqueeze(1)).squeeze(1)
    result = {
        "plain_accuracy": plain_acc,
        "plain_best_accuracy": plain_best,
        "mwn_accuracy": mwn_acc,
        "mwn_best_accuracy": mwn_best,
        "inner_loss_first": losses["inner"][0] if losses["inner"] else float("nan"),
        "inner_loss_last": losses["inner"][-1] if losses["inner"] else float("nan"),
        "outer_loss_first": losses["outer"][0] if losses["outer"] else float("nan"),
        "outer_loss_last": losses["outer"][-1] if losses["outer"] else float("nan"),
        "outer_steps": engine.status("outer").steps,
        "weight_net_change": moved,
        "weight_clean": float(weights[~corrupted].mean()) if (~corrupted).any() else float("nan"),
        "weight_corrupted": float(weights[corrupted].mean()) if corrupted.any() else float("nan"),
        "plain_seconds": plain_seconds,
        "mwn_seconds": mwn_seconds,
    }
    if args.imbalanced_factor is not None:
        rare, frequent = int(np.argmin(counts)), int(np.argmax(counts))
        result["weight_rarest_class"] = float(weights[y_true == rare].mean())
        result["weight_most_frequent_class"] = float(weights[y_true == frequent].mean())

    print("summary")
    print(
        f"  test accuracy   baseline {plain_acc:.3f}   meta-weight-net {mwn_acc:.3f}   ({mwn_acc - plain_acc:+.3f})"
    )
    print(
        f"  best accuracy   baseline {plain_best:.3f}   meta-weight-net {mwn_best:.3f}   (Betty reports this one)"
    )
    print(
        f"  outer loss      {result['outer_loss_first']:.3f} -> {result['outer_loss_last']:.3f} (clean meta set)"
    )
    if corrupted.any():
        print(
            f"  mean weight     clean examples {result['weight_clean']:.3f}, "
            f"corrupted {result['weight_corrupted']:.3f}"
        )
    if args.imbalanced_factor is not None:
        print(
            f"  mean weight     rarest class {result['weight_rarest_class']:.3f}, "
            f"most frequent {result['weight_most_frequent_class']:.3f}"
        )
    print(
        "  weight(loss)    "
        + "  ".join(f"{l:.0f}:{w:.2f}" for l, w in zip(range(6), curve.tolist(), strict=True))
    )
    result["history"] = engine.history
    return result


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
