"""Mixed precision and data parallel: how close each gets to the fp32, one-process hypergradient.

Part 1 (precision): a digits MLP (64-8-10) trained under learnable per-example weights (200 examples,
L2 1e-2) is converged by L-BFGS; one upper hypergradient step is then taken from that state in fp32, bf16
and fp16 (loss scale 65536), and in bf16 with ``hvp_precision="autocast"``; the cosine with the fp32
hypergradient is reported per method, median and range over seeds.

Part 2 (data parallel): two gloo processes on 127.0.0.1 (this script re-run as its own workers) train the
digits MLP with 303 learnable example weights for ``ITERATIONS`` iterations on odd global batches (101,
shards 51/50), with the exact scheme (every Hessian-vector product and pushed vector summed over ranks)
and with Betty's (each rank solves the system of its own shard's mean loss with its own gradient; the
results are averaged at the end, weighted by shard size). Reported: the largest relative error of the upper gradient against one process on the same
global batches, per method and seed, and the ratio Betty / exact.

Writes ``benchmarks/results/precision_dp.md`` and ``precision_dp.png``. One CPU thread per process.
"""

from __future__ import annotations

import copy
import os
import platform
import socket
import statistics
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import matplotlib
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "precision_dp.md"
PLOT = RESULTS.with_suffix(".png")
SEEDS = [0, 1, 2]
ITERATIONS = 10
L2 = 1e-2
PRECISION_CONFIGS = {
    "cg": {"hypergrad": "cg", "iterations": 500},
    "neumann": {"hypergrad": "neumann", "iterations": 200, "damping": 0.5},
    "fixed_point": {"hypergrad": "fixed_point", "iterations": 200, "damping": 0.5},
    "unroll": {"hypergrad": "unroll"},
    "darts": {"hypergrad": "darts"},
}
VARIANTS = {"bf16": ("bf16", "fp32"), "fp16": ("fp16", "fp32"), "bf16 autocast HVPs": ("bf16", "autocast")}
DP_CONFIGS = {
    "cg": {"hypergrad": "cg", "iterations": 10, "damping": 1.0, "on_solver_failure": "ignore"},
    "neumann": {"hypergrad": "neumann", "iterations": 10, "alpha": 0.3, "on_solver_failure": "ignore"},
}


class WeightedMLP(Problem):
    def training_step(self, batch):
        x, y, idx = batch
        weights = torch.sigmoid(self.weights.module.logits[idx])
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        return (weights * losses).mean() + 0.5 * L2 * sum((p**2).sum() for p in self.module.parameters())


class Validation(Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.mlp(x), y)


class Logits(nn.Module):
    def __init__(self, n: int, start: torch.Tensor | None = None):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n) if start is None else start)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


# --------------------------------------------------------------------------- part 1: precision
def converged(seed: int) -> tuple[nn.Module, Logits, tuple, tuple]:
    x, y = digits()
    train = (x[:200], y[:200], torch.arange(200))
    valid = (x[200:400], y[200:400])
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    weights = Logits(200, torch.linspace(-1, 1, 200))
    solver = torch.optim.LBFGS(mlp.parameters(), lr=1, max_iter=300, tolerance_grad=1e-7, tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        solver.zero_grad()
        loss = (torch.sigmoid(weights.logits) * F.cross_entropy(mlp(train[0]), train[1], reduction="none")).mean()
        loss = loss + 0.5 * L2 * sum((p**2).sum() for p in mlp.parameters())
        loss.backward()
        return loss

    solver.step(closure)
    return mlp, weights, train, valid


def upper_gradient(state: tuple, method: str, precision: str, hvp_precision: str) -> torch.Tensor:
    mlp, weights, train, valid = copy.deepcopy(state[0]), copy.deepcopy(state[1]), *state[2:]
    config = ProblemConfig(**PRECISION_CONFIGS[method], hvp_precision=hvp_precision)
    lower = WeightedMLP("mlp", module=mlp, optimizer=torch.optim.SGD(mlp.parameters(), lr=0.5), data=[train], config=config)
    upper = Validation("weights", module=weights, optimizer=torch.optim.SGD(weights.parameters(), lr=0.0), data=[valid])
    engine = Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
                    EngineConfig(train_iters=1, precision=precision))
    engine.run()
    return engine.status("weights").gradient["weights.logits"]


def precision_part() -> dict[tuple[str, str], list[float]]:
    cosines: dict[tuple[str, str], list[float]] = {}
    for seed in SEEDS:
        state = converged(seed)
        for method in PRECISION_CONFIGS:
            reference = upper_gradient(state, method, "fp32", "fp32")
            for variant, (precision, hvp) in VARIANTS.items():
                if hvp == "autocast" and method not in ("cg", "darts"):
                    continue
                got = upper_gradient(state, method, precision, hvp)
                cosine = float(F.cosine_similarity(got, reference, dim=0))
                cosines.setdefault((method, variant), []).append(cosine)
                print(f"seed {seed} {method:12s} {variant:20s} cosine {cosine:.7f}", flush=True)
    return cosines


# --------------------------------------------------------------------------- part 2: data parallel
def dp_run(method: str, seed: int, distributed: bool, betty: bool) -> torch.Tensor:
    """The upper gradients of ``ITERATIONS`` iterations (exact scheme, or Betty's with ``betty``)."""
    x, y = digits()
    train = [(x[i : i + 101], y[i : i + 101], torch.arange(i, i + 101)) for i in (0, 101, 202)]
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    weights = Logits(303)
    lower = WeightedMLP("mlp", module=mlp, optimizer=torch.optim.SGD(mlp.parameters(), lr=0.3), data=train,
                        config=ProblemConfig(**DP_CONFIGS[method]))
    upper = Validation("weights", module=weights, optimizer=torch.optim.SGD(weights.parameters(), lr=10.0),
                       data=[(x[400:501], y[400:501])])
    engine = Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
                    EngineConfig(train_iters=ITERATIONS, distributed=distributed))
    if betty:  # Betty's scheme: each rank solves its shard's own system (mean loss), the step averages
        engine._dist.averaged = lambda values: values  # noqa: SLF001 (each rank's derivatives its own)

        def shard_mean(params: dict) -> dict:  # the rank's share-weighted vector or product, over its share
            return {k: t / engine._setups["mlp"].stream.share for k, t in params.items()}  # noqa: SLF001

        engine._dist.matvec_wrap = lambda inner: lambda mv: inner(lambda u: shard_mean(mv(u)))  # noqa: SLF001
        engine._dist.push_wrap = lambda inner: lambda push: lambda c: inner(push)(replace(c, v=shard_mean(c.v)))  # noqa: SLF001
    gradients = []
    for _ in range(ITERATIONS):
        engine.run(1)
        gradients.append(engine.status("weights").gradient["weights.logits"].clone())
    return torch.stack(gradients)


def worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))
    try:
        results = {(m, s, b): dp_run(m, s, True, b) for m in DP_CONFIGS for s in SEEDS for b in (False, True)}
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def dp_part(folder: Path) -> dict[tuple[str, str], list[float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), str(port), str(folder / f"{r}.pt")], env=env)
             for r in range(2)]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"a data-parallel worker failed (exit {p.returncode})")
    ranks = [torch.load(folder / f"{r}.pt") for r in range(2)]
    errors: dict[tuple[str, str], list[float]] = {}
    for method in DP_CONFIGS:
        for seed in SEEDS:
            reference = dp_run(method, seed, False, False)
            for betty, label in ((False, "exact (ours)"), (True, "Betty: average at the end")):
                got = ranks[0][(method, seed, betty)]
                error = float((got - reference).abs().max() / reference.abs().max())
                errors.setdefault((method, label), []).append(error)
                print(f"seed {seed} {method:8s} {label:26s} relative error {error:.3g}", flush=True)
    return errors


# --------------------------------------------------------------------------- report
def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def report(cosines: dict, errors: dict) -> None:
    lines = [
        "# Mixed precision and data parallel: agreement with fp32 and with one process",
        "",
        f"`benchmarks/precision_dp.py`, torch {torch.__version__}, {platform.machine()} CPU, one thread per process, "
        f"on a shared 2-core machine loaded by other jobs (accuracy only: nothing here is timed). Seeds {SEEDS}: "
        "median [min, max].",
        "",
        "## Precision: cosine with the fp32 hypergradient (digits MLP 64-8-10, L-BFGS-converged, one upper step)",
        "",
        "| method | " + " | ".join(VARIANTS) + " |",
        "|---|" + "---|" * len(VARIANTS),
    ]
    for method in PRECISION_CONFIGS:
        cells = [spread(cosines[(method, v)], ".6f") if (method, v) in cosines else "" for v in VARIANTS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Data parallel: max relative error of the upper gradient against one process ({ITERATIONS} iterations, 2 gloo ranks)",
        "",
        "| method | exact (ours) | Betty: average at the end | ratio Betty / ours |",
        "|---|---|---|---|",
    ]
    for method in DP_CONFIGS:
        ours, betty = errors[(method, "exact (ours)")], errors[(method, "Betty: average at the end")]
        ratio = statistics.median(betty) / max(statistics.median(ours), 1e-300)
        lines.append(f"| {method} | {spread(ours, '.2e')} | {spread(betty, '.2e')} | {ratio:.2e} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, variant in enumerate(VARIANTS):
        methods = [m for m in PRECISION_CONFIGS if (m, variant) in cosines]
        gaps = [max(1 - statistics.median(cosines[(m, variant)]), 1e-9) for m in methods]
        left.bar([PRECISION_CONFIGS_INDEX[m] + 0.25 * i for m in methods], gaps, width=0.25, label=variant)
    left.set_xticks([i + 0.25 for i in range(len(PRECISION_CONFIGS))], list(PRECISION_CONFIGS))
    left.set_yscale("log")
    left.set_ylabel("1 - cosine with fp32 (median)")
    left.legend()
    for i, label in enumerate(("exact (ours)", "Betty: average at the end")):
        right.bar([j + 0.35 * i for j in range(len(DP_CONFIGS))], [statistics.median(errors[(m, label)]) for m in DP_CONFIGS],
                  width=0.35, label=label)
    right.set_xticks([j + 0.175 for j in range(len(DP_CONFIGS))], list(DP_CONFIGS))
    right.set_yscale("log")
    right.set_ylabel("relative error vs one process (median)")
    right.legend()
    figure.tight_layout()
    figure.savefig(PLOT, dpi=120)


PRECISION_CONFIGS_INDEX = {m: i for i, m in enumerate(PRECISION_CONFIGS)}


def main() -> None:
    torch.set_num_threads(1)
    if sys.argv[1:2] == ["--rank"]:
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    folder = RESULTS.parent / ".precision_dp"
    folder.mkdir(parents=True, exist_ok=True)
    errors = dp_part(folder)
    cosines = precision_part()
    report(cosines, errors)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
