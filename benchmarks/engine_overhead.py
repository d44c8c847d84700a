"""Engine overhead on plain steps: one Engine step of a first-order problem vs a hand-written loop.

Both sides run the same model, optimizer and data: the hand loop is ``loss = training_step(batch);
optimizer.zero_grad(); loss.backward(); optimizer.step()`` over the same cycled list of batches. The
Engine runs ``Engine([problem]).run(STEPS)`` (one problem, no hypergradient) twice over: with eager
execution (the default) and with the captured plain step (``ProblemConfig(execution="compiled")``:
forward, backward, update and the non-finite check's norms as one compiled graph). Two closed-form problems of ``betty_like.testing.closed_form`` in their plain form (float64), and two models:

- ``ridge``: the ridge regression lower problem (d = 5, 40 rows, SGD) with its penalty fixed;
- ``weights``: the per-sample weighted least squares lower problem (d = 5, 40 rows, SGD) with its
  weights fixed;
- ``mlp``: a 64-32-10 MLP classifier on 64-row batches with Adam (float32), to show the share at a
  more realistic per-step cost;
- ``gpt``: a 46K-parameter GPT-like model (decoder only: token and position embeddings, 2 pre-norm
  blocks of causal self-attention and an MLP, width 40, 4 heads, context 32, vocabulary 64) with
  AdamW, next-token cross-entropy on generated token sequences (4 per batch).

The three sides are interleaved in one process, ROUNDS times, in a rotating order; the table reports
medians over rounds with the min-max spread, and the ratios engine / hand loop per round (median and
spread). The captured side is compiled in its warm-up round (its time is reported, not counted). Times are
the CPU time of the calling thread (``time.thread_time``): one torch thread, and autograd runs CPU
graphs on the calling thread, so it is the whole step's cost without the time other jobs on a shared
machine take the core away; the wall-clock ratio is reported too. Writes
benchmarks/results/engine_overhead.md and engine_overhead.png.

Problem names on the command line time only those; ``--no-write`` prints the table without writing
the results; ``--profile [name]`` prints the top of a cProfile of the Engine side instead.
"""

from __future__ import annotations

import cProfile
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.testing.closed_form import linear, regression_data

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STEPS = 300
GPT_STEPS = 100  # its step is ~10x a closed-form one's
VOCAB, WIDTH, HEADS, CONTEXT = 64, 40, 4, 32
ROUNDS = int(__import__("os").environ.get("ROUNDS", 9))


class Ridge(Problem):
    def training_step(self, batch):
        x, y = batch
        residual = self.module(x).squeeze(-1) - y
        return 0.5 * (residual**2).mean() + 0.5 * 0.3 * (self.module.weight**2).sum()


class Weighted(Problem):
    weights = torch.linspace(0.1, 1.0, 40, dtype=torch.float64)

    def training_step(self, batch):
        x, y = batch
        return 0.5 * (self.weights * (self.module(x).squeeze(-1) - y) ** 2).mean()


class Classifier(Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.module(x), y)


class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention (torch's fused kernel) then a 4x MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, HEADS, -1).transpose(1, 2) for z in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """The 46K-parameter decoder: embeddings, 2 blocks, final norm, untied head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, WIDTH), nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.Sequential(Block(), Block())
        self.ln, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        return self.head(self.ln(self.blocks(h)))


class NextToken(Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.module(x).flatten(0, 1), y.flatten())


def workload(name: str) -> tuple[type[Problem], Callable[[], nn.Module], Callable, list]:
    if name in ("ridge", "weights"):
        data = [regression_data(40, 5, seed=0)]
        return (Ridge if name == "ridge" else Weighted), (lambda: linear(5)), (lambda p: torch.optim.SGD(p, lr=0.1)), data
    g = torch.Generator().manual_seed(0)
    if name == "gpt":
        sequences = [torch.randint(0, VOCAB, (4, CONTEXT + 1), generator=g) for _ in range(4)]
        data = [(s[:, :-1], s[:, 1:]) for s in sequences]
        return NextToken, GPT, (lambda p: torch.optim.AdamW(p, lr=1e-3)), data
    data = [(torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(4)]
    net = lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # noqa: E731
    return Classifier, net, (lambda p: torch.optim.Adam(p, lr=1e-3)), data


REMAINS = [
    "What an engine step still does beyond the hand loop, per step (docs/execution.md, engine overhead):",
    "",
    "- the wave's transaction: a snapshot of torch's CPU generator (`torch.get_rng_state()`, a 5 KB copy) and a "
    "read of the raw words of Python's and numpy's generators (2.5 KB each; their full states are re-read only "
    "when something drew), so that an interrupted `run()` continues exactly; measured the largest single item "
    "(30-60 µs per ridge step on this machine, by removing it);",
    "- the non-finite check: a fused per-tensor norm of the gradient and one stack, read with the loss in the one "
    "host read the hand loop's `loss.item()` also makes (measured within noise of the hand loop);",
    "- Python bookkeeping, each piece within this machine's ±30 µs noise floor when removed alone: the config "
    "check, the batch stream, the schedule and its counters, the loss audit's and metrics' context, the "
    "user-code wrapper and loss checks, the record, callback dispatch.",
]


def steps(name: str) -> int:
    """Steps per timed round."""
    return GPT_STEPS if name == "gpt" else STEPS


def engine_side(name: str, execution: str = "eager") -> Callable[[], None]:
    cls, make, opt, data = workload(name)
    module = make()
    problem = cls("p", module=module, optimizer=opt(module.parameters()), data=data, config=ProblemConfig(execution=execution))
    engine = Engine([problem], config=EngineConfig(train_iters=10**9, log_every=10**9))
    return lambda: engine.run(steps(name))


def hand_side(name: str) -> Callable[[], None]:
    cls, make, opt, data = workload(name)
    module = make()
    optimizer = opt(module.parameters())
    problem = cls("p", module=module, optimizer=optimizer, data=data)  # only its training_step is used

    def run() -> None:
        for i in range(steps(name)):
            loss = problem.training_step(data[i % len(data)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the engine reads each loss once (its non-finite check and the record)

    return run


def timed(run: Callable[[], None], count: int) -> tuple[float, float]:
    """CPU time of this thread and wall time per step, µs."""
    cpu, wall = time.thread_time(), time.perf_counter()
    run()
    return (time.thread_time() - cpu) / count * 1e6, (time.perf_counter() - wall) / count * 1e6


SIDES = ("engine", "captured", "hand")


def measure(name: str) -> dict[str, list[float]]:
    runs = {"engine": engine_side(name), "captured": engine_side(name, "compiled"), "hand": hand_side(name)}
    result: dict[str, list[float]] = {k: [] for k in (*SIDES, "ratio", "captured_ratio", "wall_ratio", "excess", "compile")}
    for side, run in runs.items():  # warm-up; the captured side compiles here
        start = time.perf_counter()
        run()
        if side == "captured":
            result["compile"].append(time.perf_counter() - start)
    for r in range(ROUNDS):
        order = SIDES[r % 3:] + SIDES[: r % 3]
        times = {k: timed(runs[k], steps(name)) for k in order}
        for k, (cpu, _) in times.items():
            result[k].append(cpu)
        result["ratio"].append(times["engine"][0] / times["hand"][0])
        result["captured_ratio"].append(times["captured"][0] / times["hand"][0])
        result["wall_ratio"].append(times["engine"][1] / times["hand"][1])
        result["excess"].append(times["engine"][0] - 1.10 * times["hand"][0])
    return result


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def verdict(results: dict[str, dict[str, list[float]]], ratio: str, how: str) -> str:
    missed = [n for n, r in results.items() if statistics.median(r[ratio]) > 1.10]
    if not missed:
        return f"Goal met on every row {how} (median ratio ≤ 1.10)."
    return f"Goal missed {how} on {', '.join(missed)}."


def missed_by(results: dict[str, dict[str, list[float]]]) -> str:
    """How far the eager rows are from the goal, in ratio and in µs per step."""
    missed = [n for n, r in results.items() if statistics.median(r["ratio"]) > 1.10]
    if not missed:
        return ""
    return " By (median ratio minus 1.10; median over rounds of the engine's CPU µs per step above 1.10 × the hand loop's): " + "; ".join(
        f"{n} by {statistics.median(results[n]['ratio']) - 1.10:.2f} ({statistics.median(results[n]['excess']):.0f} µs)"
        for n in missed) + "."


def main() -> None:
    torch.set_num_threads(1)
    if "--profile" in sys.argv:
        run = engine_side(sys.argv[-1] if sys.argv[-1] != "--profile" else "ridge")
        run()
        cProfile.runctx("run()", globals(), {"run": run}, "/tmp/engine_overhead.prof")
        pstats.Stats("/tmp/engine_overhead.prof").sort_stats("tottime").print_stats(25)
        return
    names = [n for n in ["ridge", "weights", "mlp", "gpt"] if n in sys.argv[1:]] or ["ridge", "weights", "mlp", "gpt"]
    results = {n: measure(n) for n in names}
    lines = [
        "# Engine overhead on plain steps",
        "",
        f"`benchmarks/engine_overhead.py`: {STEPS} steps per round ({GPT_STEPS} for gpt), {ROUNDS} interleaved rounds, "
        f"one torch thread, torch {torch.__version__}, {platform.processor() or platform.machine()}. Ran on a shared "
        "2-core CPU loaded by other jobs: times are the calling thread's CPU time (the wall-clock ratio, last column, "
        "also counts the time other jobs held the core), and the paired ratio is the number to read.",
        "",
        "Per step, median (min–max over rounds). Goal: engine / hand loop ≤ 1.10. *eager*: the Engine with "
        "its default eager execution; *captured*: the Engine with `ProblemConfig(execution=\"compiled\")` "
        "(the captured plain step; compiled once in the warm-up, time in the last column).",
        "",
        "| problem | hand loop µs | eager engine µs | eager / hand | captured engine µs | captured / hand "
        "| wall-clock eager / hand | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in results.items():
        lines.append(f"| {n} | {spread(r['hand'], '.0f')} | {spread(r['engine'], '.0f')} | {spread(r['ratio'], '.3f')} "
                     f"| {spread(r['captured'], '.0f')} | {spread(r['captured_ratio'], '.3f')} "
                     f"| {spread(r['wall_ratio'], '.3f')} | {r['compile'][0]:.1f} |")
    lines += ["", verdict(results, "captured_ratio", "with the captured step"), "",
              verdict(results, "ratio", "with eager execution") + missed_by(results), "", *REMAINS]
    print("\n".join(lines))
    if "--no-write" in sys.argv:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_overhead.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3))
    eager = ax.boxplot([results[n]["ratio"] for n in names], positions=[i - 0.2 for i in range(len(names))], widths=0.3,
                       patch_artist=True, boxprops={"facecolor": "lightgrey"})
    captured = ax.boxplot([results[n]["captured_ratio"] for n in names], positions=[i + 0.2 for i in range(len(names))],
                          widths=0.3, patch_artist=True, boxprops={"facecolor": "lightblue"})
    ax.set_xticks(range(len(names)), names)
    goal = ax.axhline(1.10, color="red", linestyle="--")
    ax.legend([eager["boxes"][0], captured["boxes"][0], goal], ["eager engine", "captured step", "goal 1.10"], loc="upper right")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_ylabel("engine / hand loop per step (CPU time)")
    fig.tight_layout()
    fig.savefig(RESULTS / "engine_overhead.png", dpi=120)


if __name__ == "__main__":
    main()
