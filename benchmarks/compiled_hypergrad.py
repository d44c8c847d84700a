"""Compiled vs eager Hessian-vector products in a ``cg`` hypergradient (``compile_hypergrad``).

Digits data reweighting: a 64-32-10 MLP (float32) trained on 128-row batches of sklearn's digits,
each example's loss weighted by the sigmoid of an upper problem's per-example logit; the upper loss
is the MLP's cross-entropy on a 128-row validation batch. The lower uses ``hypergrad="cg"`` with
``iterations=20`` and ``tol=1e-30`` (so every solve runs exactly 20 products) and ``damping=1.0``.

Timed: one engine iteration = one plain lower step + one upper step whose hypergradient is the cg
solve, for ``compile_hypergrad=False`` (eager products: vector-Jacobian products on a gradient graph,
reverse over reverse) and ``True`` (forward-over-reverse captured with ``torch.compile``). Interleaved
in one process, ROUNDS rounds of STEPS iterations each after a warm-up (the compile happens there and
is reported separately); medians with min-max spread and the paired ratio eager / compiled.
Also the relative difference of the two hypergradients at the same state. One torch thread.
Writes benchmarks/results/compiled_hypergrad.md and .png.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STEPS = 10
ROUNDS = int(os.environ.get("ROUNDS", 7))
BATCH = 128


class Classifier(Problem):
    def training_step(self, batch):
        x, y, index = batch
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        return (torch.sigmoid(self.weights.module["logits"][index]) * losses).mean()


class Validation(Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)


def data():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    index = torch.arange(len(x))
    train = [(x[i : i + BATCH], y[i : i + BATCH], index[i : i + BATCH]) for i in range(0, 1024, BATCH)]
    valid = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(1024, 1024 + 4 * BATCH, BATCH)]
    return train, valid, len(x)


def build(compiled: bool) -> Engine:
    train, valid, n = data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    weights = nn.ParameterDict({"logits": nn.Parameter(torch.zeros(n))})
    lower = Classifier(
        "classifier", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=train,
        config=ProblemConfig(hypergrad="cg", iterations=20, tol=1e-30, damping=1.0, compile_hypergrad=compiled),
    )
    upper = Validation("weights", module=weights, optimizer=torch.optim.SGD(weights.parameters(), lr=1.0), data=valid)
    return Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
                  EngineConfig(train_iters=10**9, log_every=10**9))


def timed(engine: Engine, steps: int) -> float:
    start = time.perf_counter()
    engine.run(steps)
    return (time.perf_counter() - start) / steps * 1e3


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def main() -> None:
    torch.set_num_threads(1)
    eager, compiled = build(False), build(True)
    start = time.perf_counter()
    compiled.run(2)  # compiles at the first solve
    compile_s = time.perf_counter() - start
    eager.run(2)
    difference = max(
        float((compiled.status("weights").gradient[k] - eager.status("weights").gradient[k]).norm()
              / eager.status("weights").gradient[k].norm())
        for k in eager.status("weights").gradient
    )
    times: dict[str, list[float]] = {"eager": [], "compiled": [], "ratio": []}
    for r in range(ROUNDS):
        pair = [("eager", eager), ("compiled", compiled)]
        measured = {k: timed(e, STEPS) for k, e in (pair if r % 2 == 0 else pair[::-1])}
        for k, t in measured.items():
            times[k].append(t)
        times["ratio"].append(measured["eager"] / measured["compiled"])
    info = compiled.status("weights").diagnostics["classifier"].solve
    ratio = statistics.median(times["ratio"])
    lines = [
        "# Compiled vs eager Hessian-vector products (`compile_hypergrad`)",
        "",
        f"`benchmarks/compiled_hypergrad.py`: digits reweighting, MLP 64-32-10 (float32), batch {BATCH}, cg with "
        f"{info.iterations} products per solve, damping 1.0. {ROUNDS} interleaved rounds of {STEPS} engine iterations "
        f"(one plain lower step + one upper step with the cg hypergradient each); one torch thread, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}. Ran on a shared 2-core CPU loaded by "
        "other jobs: absolute times move, the paired ratio is the number to read.",
        "",
        "| products | ms per iteration, median (min–max) |",
        "|---|---|",
        f"| eager (reverse over reverse) | {spread(times['eager'], '.2f')} |",
        f"| compiled (forward over reverse) | {spread(times['compiled'], '.2f')} |",
        "",
        f"Speed-up eager / compiled, paired per round: **{spread(times['ratio'], '.2f')}**. Goal: ≥ 3×. "
        + ("Met." if ratio >= 3 else f"Not met: {ratio:.2f}× is {3 / ratio:.1f}× short of it. On this shared "
           "CPU the captured products are not faster than the eager ones at all (single products timed alone, outside "
           "this script: 1.4–1.7 ms compiled vs 1.5–1.8 ms eager), so the 2.5–3× of the issue's probe is not "
           "reproduced here; the iteration also holds a plain lower step, the upper forward/backward and the residual "
           "graph every solve builds eagerly, which compiling the products does not touch. Not measured on a GPU."),
        "",
        f"Compile (first solve, once per input shape): {compile_s:.1f} s. Hypergradients of the two at the same state "
        f"differ by {difference:.1e} (relative, float32).",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compiled_hypergrad.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.boxplot([times["eager"], times["compiled"]], tick_labels=["eager", "compiled"])
    ax.set_ylabel("ms per engine iteration (cg, 20 HVPs)")
    ax.set_title(f"eager / compiled = {ratio:.2f}")
    fig.tight_layout()
    fig.savefig(RESULTS / "compiled_hypergrad.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
