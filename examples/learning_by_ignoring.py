"""Learning by Ignoring on sklearn's digits: a CPU-scale port of Betty's ``learning_by_ignoring`` example.

Learning by Ignoring (Zhang et al., 2020; Betty's ``examples/learning_by_ignoring``) pretrains on a
large *source* set, finetunes on a small *target* set, and learns how much each source example should
count in pretraining, so that source data that transfers badly to the target is ignored. Betty runs it
on OfficeHome (pretrain on one domain, finetune on another) with ImageNet ResNets; this script keeps
its three problems, losses, optimizers and graph and shrinks the rest to the 8x8 digits and an MLP:

* source: most of the digits, with ``--source_noise`` of their labels flipped to a wrong class (the
  examples pretraining should learn to ignore); optionally (``--shift mirror``) those examples are
  instead mirrored left-right with correct labels, a domain shift rather than label noise;
* target: ``--target_size`` clean digits for finetuning, ``--valid_size`` more for ``reweight``'s loss
  (Betty reuses the target training images, under test-time transforms, for it), and a clean test set.

Three problems, wired exactly as in Betty::

    pretrain  source classifier; loss = mean_i sigmoid(a_i) * CE_i on source batches, where a_i is
              source example i's ignoring logit, a parameter of ``reweight``
    finetune  target classifier; loss = CE on target batches + lam * ||theta_f - theta_p||^2, the
              squared distance of its feature layer to pretrain's (the classifier head is free)
    reweight  the ignoring logits a (one per source example); loss = finetune's CE on the validation
              split + the same proximity term

    dependencies = {"u2l": {reweight: [pretrain]},
                    "l2u": {pretrain: [finetune, reweight], finetune: [reweight]}}

``reweight``'s parameters appear only in ``pretrain``'s loss, yet its loss reads both ``finetune``'s
and ``pretrain``'s solutions: its hypergradient is the total derivative through
a -> pretrain -> reweight (the proximity term) and a -> pretrain -> finetune -> reweight (the
validation loss), each lower solution differentiated by its own method (``--method``; Betty's
example uses ``darts`` for all three). Betty's reweighter is a ResNet scoring each image; its
example also defines a per-example table (``ReweightingModule``), which is what the paper learns and
what this script uses.

Measured, on the target test set: finetuning alone, Betty's ``--baseline`` (pretrain with every
weight 1, then the same finetuning) and Learning by Ignoring, all with the same initial weights,
optimizers and batches; and the mean learned weight of clean versus corrupted source examples.

Run ``python examples/learning_by_ignoring.py --help``; ``main(argv)`` returns the numbers as a dict.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reweight_digits import TracksTestAccuracy, accuracy  # noqa: E402

METHODS = ["unroll", "first_order", "darts", "sama", "neumann", "cg", "fixed_point"]
# Linear-solver budget for the implicit methods: Betty runs 1 iteration of neumann/cg by default;
# a handful keeps this example at CPU scale while letting the solve make progress.
SOLVER = {"iterations": 5, "damping": 0.1}


# --------------------------------------------------------------------------- data
def lbi_digits(seed: int, source_noise: float, shift: str, target_size: int, valid_size: int, test_size: int):
    """Source (with the indices of its harmful examples), target-train, validation and test splits."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order])
    cuts = np.cumsum([test_size, valid_size, target_size])
    test, valid, target = (slice(0, cuts[0]), slice(cuts[0], cuts[1]), slice(cuts[1], cuts[2]))
    xs, ys = x[cuts[2] :].clone(), y[cuts[2] :].clone()
    harmful = torch.tensor(rng.random(len(ys)) < source_noise)
    if shift == "noise":  # a harmful example's label becomes a uniformly chosen *different* class
        ys[harmful] = (ys[harmful] + torch.tensor(rng.integers(1, 10, int(harmful.sum())))) % 10
    else:  # "mirror": the image is flipped left-right, its label kept
        xs[harmful] = xs[harmful].view(-1, 8, 8).flip(-1).reshape(-1, 64)
    return (xs, ys, harmful), (x[target], y[target]), (x[valid], y[valid]), (x[test], y[test])


def indexed_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled ``(x, y, index)`` mini-batches; the index names each example's ignoring weight."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(y))
    while True:
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield x[index], y[index], index


# --------------------------------------------------------------------------- modules
def mlp(hidden: int = 64) -> nn.Module:
    """A feature layer and a classifier head named ``fc``, as Betty's parameter groups expect."""
    return nn.Sequential(
        OrderedDict(features=nn.Sequential(nn.Linear(64, hidden), nn.ReLU()), fc=nn.Linear(hidden, 10))
    )


class IgnoringLogits(nn.Module):
    """One logit per source example (Betty's ``ReweightingModule``); its weight is the sigmoid."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.weight[index]


def proximity(finetune: nn.Module, pretrain: nn.Module, lam: float) -> torch.Tensor:
    """``lam * ||theta_f - theta_p||^2`` over every parameter except the classifier head (Betty's reg_loss)."""
    pretrained = dict(pretrain.named_parameters())
    return sum(
        lam * (p - pretrained[name]).pow(2).sum()
        for name, p in finetune.named_parameters()
        if not name.startswith("fc")
    )


# --------------------------------------------------------------------------- the three problems
class Pretraining(Problem):
    def training_step(self, batch):
        x, y, index = batch
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        weights = torch.sigmoid(self.reweight(index))
        return (losses * weights).mean()  # unnormalised, as in Betty


class Finetuning(TracksTestAccuracy, Problem):
    def __init__(self, *args, lam: float, test=None, verbose: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lam, self.test, self.verbose, self.validations, self.best_acc = lam, test, verbose, 0, 0.0

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.module(x), y) + proximity(self.module, self.pretrain.module, self.lam)


class Reweighting(Problem):
    def __init__(self, *args, lam: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lam = lam

    def training_step(self, batch):
        x, y = batch
        loss = F.cross_entropy(self.finetune(x), y)
        return loss + proximity(self.finetune.module, self.pretrain.module, self.lam)


# --------------------------------------------------------------------------- training
def lower_config(method: str) -> ProblemConfig:
    """Betty's ``Config(type=method, unroll_steps=1)`` for pretrain and finetune.

    Betty's darts is unscaled (``darts_scale="identity"`` in the new engine); ours is left at the
    default (each parameter group's own learning rate, DARTS' xi). ``reweight`` steps with Adam,
    which is nearly invariant to a constant factor on its gradient, so the choice hardly matters here.
    For the implicit methods the solver gets a small budget; an unconverged solve is accepted
    (Betty's are one iteration long).
    """
    if method not in ("neumann", "cg", "fixed_point"):
        return ProblemConfig(hypergrad=method, unroll_steps=1)
    return ProblemConfig(hypergrad=method, unroll_steps=1, **SOLVER)


def adam(model: nn.Module, args) -> torch.optim.Adam:
    """Betty's ``build_optimizer``: Adam, one learning rate for the features and one for the ``fc`` head."""
    features = [p for name, p in model.named_parameters() if not name.startswith("fc")]
    head = [p for name, p in model.named_parameters() if name.startswith("fc")]
    groups = [{"params": features, "lr": args.features_lr}, {"params": head, "lr": args.classifier_lr}]
    return torch.optim.Adam(groups, weight_decay=args.weight_decay)


def step_lr(optimizer: torch.optim.Optimizer, args):
    """Betty's StepLR(step_size=400, gamma=0.1) over 1000 iterations, scaled to ``--iters``."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, args.iters * 2 // 5), gamma=0.1)


def initial_models(args) -> tuple[nn.Module, nn.Module]:
    """Pretrain and finetune start from the same weights (in Betty: the same ImageNet checkpoint)."""
    torch.manual_seed(args.seed)
    pretrain = mlp(args.hidden)
    return pretrain, copy.deepcopy(pretrain)


def train_plain(source, target, test, args, use_source: bool, valid_every: int) -> tuple[nn.Module, float]:
    """A baseline on the same batches: Betty's ``--baseline`` (source weights all 1), or finetuning alone."""
    pretrain, finetune = initial_models(args)
    p_opt, f_opt = adam(pretrain, args), adam(finetune, args)
    p_sched, f_sched = step_lr(p_opt, args), step_lr(f_opt, args)
    source_batches = indexed_batches(source[0], source[1], args.batch_size, args.seed)
    target_batches = indexed_batches(target[0], target[1], args.batch_size, args.seed + 1)
    lam = args.lam if use_source else 0.0
    best = 0.0
    for step in range(1, args.iters + 1):
        if use_source:
            x, y, _ = next(source_batches)
            p_opt.zero_grad()
            F.cross_entropy(pretrain(x), y).backward()
            p_opt.step()
            p_sched.step()
        x, y, _ = next(target_batches)
        f_opt.zero_grad()
        (F.cross_entropy(finetune(x), y) + proximity(finetune, pretrain, lam)).backward()
        f_opt.step()
        f_sched.step()
        if step % valid_every == 0:
            best = max(best, accuracy(finetune, *test))
    return finetune, best


def make_problems(source, target, valid, test, args, configs: Mapping[str, ProblemConfig]) -> list[Problem]:
    """The reweight, finetune and pretrain problems with the script's settings."""
    pretrain_net, finetune_net = initial_models(args)
    logits = IgnoringLogits(len(source[1]))
    p_opt, f_opt = adam(pretrain_net, args), adam(finetune_net, args)
    r_opt = torch.optim.Adam(logits.parameters(), lr=args.reweight_lr)
    pretrain = Pretraining(
        "pretrain",
        module=pretrain_net,
        optimizer=p_opt,
        scheduler=step_lr(p_opt, args),
        data=indexed_batches(source[0], source[1], args.batch_size, args.seed),
        config=configs.get("pretrain", lower_config(args.method)),
    )
    finetune = Finetuning(
        "finetune",
        module=finetune_net,
        optimizer=f_opt,
        scheduler=step_lr(f_opt, args),
        data=((x, y) for x, y, _ in indexed_batches(target[0], target[1], args.batch_size, args.seed + 1)),
        config=configs.get("finetune", lower_config(args.method)),
        lam=args.lam,
        test=test,
        verbose=args.verbose,
    )
    reweight = Reweighting(
        "reweight",
        module=logits,
        optimizer=r_opt,
        scheduler=step_lr(r_opt, args),
        data=((x, y) for x, y, _ in indexed_batches(valid[0], valid[1], args.batch_size, args.seed + 2)),
        config=configs.get("reweight", ProblemConfig()),
        lam=args.lam,
    )
    return [reweight, finetune, pretrain]


def problems(configs: Mapping[str, ProblemConfig], argv: Sequence[str] = ()) -> list[Problem]:
    """The CLI experiment's factory: the three problems with the settings ``argv`` gives the script."""
    args = parse_args([str(a) for a in argv])  # YAML turns "20" into 20
    return make_problems(*splits(args), args, configs)


def splits(args):
    """Source (with harmful examples), target, validation and test splits."""
    return lbi_digits(args.seed, args.source_noise, args.shift, args.target_size, args.valid_size, 400)


def train_lbi(source, target, valid, test, args, valid_every: int):
    reweight, finetune, pretrain = make_problems(source, target, valid, test, args, {})
    engine = Engine(
        [reweight, finetune, pretrain],
        dependencies={
            "u2l": {reweight: [pretrain]},
            "l2u": {pretrain: [finetune, reweight], finetune: [reweight]},
        },
        config=EngineConfig(train_iters=args.iters, valid_every=valid_every, seed=args.seed),
    )
    engine.run()
    return engine, finetune.module, reweight.module, finetune.best_acc


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--iters", type=int, default=1000, help="engine iterations (one step of each problem)"
    )
    parser.add_argument(
        "--method", default="darts", choices=METHODS, help="hypergradient method of pretrain and finetune"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source_noise", type=float, default=0.5, help="fraction of harmful source examples")
    parser.add_argument(
        "--shift", default="noise", choices=["noise", "mirror"], help="what makes them harmful"
    )
    parser.add_argument("--target_size", type=int, default=50)
    parser.add_argument("--valid_size", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--features_lr", type=float, default=1e-3)
    parser.add_argument("--classifier_lr", type=float, default=1e-2)
    parser.add_argument("--reweight_lr", type=float, default=1e-1)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--lam", type=float, default=0.1, help="weight of the proximity term")
    parser.add_argument("--valid_points", type=int, default=10, help="test-accuracy checks during training")
    parser.add_argument("--verbose", action="store_true", help="print every validation point")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    """Run the two baselines and Learning by Ignoring, print a summary, return the numbers."""
    args = parse_args(argv)
    source, target, valid, test = splits(args)
    harmful = source[2]
    valid_every = max(1, args.iters // args.valid_points)
    print(
        f"learning by ignoring on digits: {len(source[1])} source examples ({float(harmful.float().mean()):.0%} "
        f"harmful: {args.shift}), {len(target[1])} target, {len(valid[1])} validation, {len(test[1])} test; "
        f"method={args.method}, {args.iters} iterations"
    )
    results: dict[str, float] = {}
    phases = [("target only", False), ("pretrain + finetune (Betty's --baseline)", True)]
    for i, (label, use_source) in enumerate(phases, start=1):
        print(f"[{i}/3] {label}")
        start = time.perf_counter()
        model, best = train_plain(source, target, test, args, use_source, valid_every)
        key = "baseline" if use_source else "target_only"
        results[f"{key}_accuracy"], results[f"{key}_best_accuracy"] = accuracy(model, *test), best
        results[f"{key}_seconds"] = time.perf_counter() - start
        print(
            f"      test acc {results[f'{key}_accuracy']:.3f} (best {best:.3f}) in {results[f'{key}_seconds']:.1f} s"
        )

    print("[3/3] learning by ignoring: reweight -> pretrain -> finetune")
    start = time.perf_counter()
    engine, model, logits, best = train_lbi(source, target, valid, test, args, valid_every)
    results["lbi_seconds"] = time.perf_counter() - start
    results["lbi_accuracy"], results["lbi_best_accuracy"] = accuracy(model, *test), best
    print(f"      test acc {results['lbi_accuracy']:.3f} (best {best:.3f}) in {results['lbi_seconds']:.1f} s")

    losses = {n: [h["loss"] for h in engine.history if h["problem"] == n] for n in engine.problems}
    for name, values in losses.items():
        results[f"{name}_loss_first"] = values[0] if values else float("nan")
        results[f"{name}_loss_last"] = values[-1] if values else float("nan")
    weights = torch.sigmoid(logits.weight.detach())
    results["reweight_steps"] = engine.status("reweight").steps
    results["logit_change"] = float(logits.weight.detach().abs().max())  # they start at 0
    results["weight_clean"] = float(weights[~harmful].mean())
    results["weight_harmful"] = float(weights[harmful].mean()) if harmful.any() else float("nan")

    print("summary (target test accuracy, final / best)")
    for key, label in [
        ("target_only", "finetune alone"),
        ("baseline", "pretrain+finetune"),
        ("lbi", "learning by ignoring"),
    ]:
        print(f"  {label:22s} {results[f'{key}_accuracy']:.3f} / {results[f'{key}_best_accuracy']:.3f}")
    print(
        f"  reweight stepped {results['reweight_steps']} times; mean source weight: clean "
        f"{results['weight_clean']:.3f}, harmful {results['weight_harmful']:.3f} (all start at 0.5)"
    )
    print(f"  reweight loss {results['reweight_loss_first']:.3f} -> {results['reweight_loss_last']:.3f}")
    results["history"] = engine.history
    return results


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
