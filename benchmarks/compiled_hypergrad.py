"""Compiled vs eager hypergradients of a ``cg`` lower problem (``compile_hypergrad``).

Digits data reweighting: a 64-32-10 MLP (float32) trained on 128-row batches of sklearn's digits,
each example's loss weighted by the sigmoid of an upper problem's per-example logit; the upper loss
is the MLP's cross-entropy on a 128-row validation batch. The lower uses ``hypergrad="cg"`` with
``iterations=20`` and ``tol=1e-30`` (so every solve runs exactly 20 products) and ``damping=1.0``.

Variants: ``compile_hypergrad=False`` (eager products: vector-Jacobian products on a gradient graph,
reverse over reverse, one CG iteration at a time) and ``True`` with ``solver_check_every`` in BLOCKS
(forward-over-reverse products, the CG iterations between two checks captured as one graph). Two rows,
each timed in ROUNDS interleaved rounds of STEPS calls after a warm-up (the compile happens there and
is reported separately): one engine iteration (plain lower step + upper step), and the upper
hypergradient alone at a fixed state. Medians with min-max spread and paired ratios eager / compiled;
also the relative difference of the hypergradients at the same state. One torch thread.
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
from betty_like.hypergrad import hypergradient

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STEPS = 10
ROUNDS = int(os.environ.get("ROUNDS", 7))
BLOCKS = [int(k) for k in os.environ.get("BLOCKS", "1,5,10").split(",")]  # solver_check_every of the compiled rows
ITERATIONS = 20
BATCH = 128
# Measured separately (cProfile of the blocks-of-5 variant; a probe of 5 products in one graph), on the same CPU.
WHY = (
    "Where the time goes (cProfile of the blocks-of-5 variant, separate run): the captured kernels take about "
    "0.46 ms per CG iteration, 13 matrix products each, because forward over reverse recomputes the primal "
    "forward and backward for every product and inductor does not share them across the unrolled iterations; so "
    "in that run the 20 iterations cost about 9 ms however they were grouped. The rest of the hypergradient stays eager: the "
    "upper forward/backward, the lower gradient graph built with create_graph for the push, the push through it "
    "and the solve's set-up (about 7 ms), plus dynamo's guards and wrappers at each block call. Longer blocks "
    "help less than they cost to compile (compile time grows about linearly with the block length). A "
    "reverse-over-reverse product traced with torch.func.vjp inside the graph (primal once per block) measured "
    "0.36 ms against 0.45 ms per product for 5 products in one graph, compiled in 44 s against 58 s (probe outside "
    "this script): about 2 ms of the 20 iterations, not enough for 3x alone and not adopted. "
    "mode='max-autotune-no-cudagraphs' on the same probe: 1.04 ms per product after a 109 s compile (one run, "
    "loaded CPU), slower than the default mode with the C++ wrapper used here; all graphs use dynamic=False "
    "(one capture per input shape). Not measured on a GPU."
)


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


def build(compiled: bool, check_every: int | None = None) -> Engine:
    train, valid, n = data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    weights = nn.ParameterDict({"logits": nn.Parameter(torch.zeros(n))})
    lower = Classifier(
        "classifier", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=train,
        config=ProblemConfig(hypergrad="cg", iterations=ITERATIONS, tol=1e-30, damping=1.0, compile_hypergrad=compiled,
                             solver_check_every=check_every),
    )
    upper = Validation("weights", module=weights, optimizer=torch.optim.SGD(weights.parameters(), lr=1.0), data=valid)
    return Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
                  EngineConfig(train_iters=10**9, log_every=10**9))


def iteration_ms(engine: Engine) -> float:
    """One engine iteration: a plain lower step and an upper step with the cg hypergradient."""
    start = time.perf_counter()
    engine.run(STEPS)
    return (time.perf_counter() - start) / STEPS * 1e3


def hypergradient_ms(engine: Engine) -> float:
    """The upper problem's hypergradient alone at the engine's current state: upper forward and backward,
    the lower gradient graph and the cg solve through it (no lower step, no optimizer update)."""
    program = engine.program()
    start = time.perf_counter()
    for _ in range(STEPS):
        hypergradient(program, "weights")
    return (time.perf_counter() - start) / STEPS * 1e3


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def main() -> None:
    torch.set_num_threads(1)
    names = ["eager"] + [f"compiled, blocks of {k}" for k in BLOCKS]
    engines = {"eager": build(False)} | {f"compiled, blocks of {k}": build(True, k) for k in BLOCKS}
    compile_s = {}
    for name, engine in engines.items():
        start = time.perf_counter()
        engine.run(2)  # a compiled one captures its product and its block at the first solve
        compile_s[name] = time.perf_counter() - start
    reference = engines["eager"].status("weights").gradient
    difference = {
        name: max(float((engine.status("weights").gradient[k] - reference[k]).norm() / reference[k].norm()) for k in reference)
        for name, engine in engines.items()
    }
    rows = {"iteration": iteration_ms, "hypergradient": hypergradient_ms}
    times = {(row, name): [] for row in rows for name in names}
    ratios = {(row, name): [] for row in rows for name in names[1:]}
    for r in range(ROUNDS):
        order = names if r % 2 == 0 else names[::-1]
        for row, measure in rows.items():
            measured = {name: measure(engines[name]) for name in order}
            for name, t in measured.items():
                times[row, name].append(t)
                if name != "eager":
                    ratios[row, name].append(measured["eager"] / t)
    solve = engines[names[-1]].status("weights").diagnostics["classifier"].solve
    best = {row: max(statistics.median(ratios[row, n]) for n in names[1:]) for row in rows}
    lines = [
        "# Compiled vs eager hypergradients (`compile_hypergrad`)",
        "",
        f"`benchmarks/compiled_hypergrad.py`: digits reweighting, MLP 64-32-10 (float32), batch {BATCH}, cg with "
        f"{solve.iterations} iterations ({solve.products} products) per solve, damping 1.0. Eager products are "
        "vector-Jacobian products on the gradient graph (reverse over reverse), one CG iteration at a time; compiled "
        "ones are forward over reverse, and the CG iterations between two residual checks (`solver_check_every`, "
        "the block length) run as one captured graph, products and CG arithmetic together. "
        f"{ROUNDS} interleaved rounds (order reversed every other round) of {STEPS} calls each; one torch thread, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}. Ran on a shared 2-core CPU loaded by "
        "other jobs: absolute times move, the paired ratios are the numbers to read.",
        "",
        "Rows: **iteration** = one engine iteration (a plain lower step + an upper step with the cg hypergradient); "
        "**hypergradient** = the upper problem's hypergradient alone at a fixed state (upper forward/backward, the "
        "lower gradient graph, the 20-iteration solve; no lower step).",
        "",
        "| variant | compile (s) | iteration, ms | eager / this | hypergradient, ms | eager / this | rel. difference to eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        cells = [f"{compile_s[name]:.1f}" if name != "eager" else "–"]
        for row in rows:
            cells.append(spread(times[row, name], ".2f"))
            cells.append("–" if name == "eager" else f"**{spread(ratios[row, name], '.2f')}**")
        cells.append("–" if name == "eager" else f"{difference[name]:.1e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Compile: wall time of a compiled engine's first two iterations, where it captures its product and its "
        "block(s) once per input shape. The product graph is the same in every compiled engine: the first one "
        "(blocks of 1) compiles it, the later ones find it in inductor's on-disk cache; each block length is "
        "compiled cold. Differences: "
        "relative norm of the upper gradient after those two iterations against the eager one (float32).",
        "",
        f"Goal ≥ 3× on the small model: best hypergradient-alone speed-up {best['hypergradient']:.2f}×"
        + (" (met)" if best["hypergradient"] >= 3 else f" ({3 / best['hypergradient']:.2f}× short)")
        + f", best iteration speed-up {best['iteration']:.2f}×"
        + (" (met)" if best["iteration"] >= 3 else f" ({3 / best['iteration']:.2f}× short)")
        + f". The iteration row adds the plain lower step and the engine around it (eager: "
        f"{statistics.median(times['iteration', 'eager']) - statistics.median(times['hypergradient', 'eager']):.1f} ms "
        "of medians), which `compile_hypergrad` does not touch (`execution=\"compiled\"` captures that step). "
        + WHY,
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compiled_hypergrad.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, row in zip(axes, rows, strict=True):
        ax.boxplot([ratios[row, n] for n in names[1:]], tick_labels=[n.removeprefix("compiled, ") for n in names[1:]])
        ax.axhline(3.0, ls="--", c="grey", lw=0.8)
        ax.axhline(1.0, c="grey", lw=0.5)
        ax.set_title(f"{row}: eager / compiled")
    axes[0].set_ylabel("speed-up (paired per round)")
    fig.tight_layout()
    fig.savefig(RESULTS / "compiled_hypergrad.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
