"""Accuracy and cost of every hypergradient method on closed-form problems, with default settings.

For each problem of :mod:`betty_like.testing` (ridge penalty, per-sample weights, three-level
chain) and each method, it reports the relative error and cosine against the exact float64
hypergradient, the solver iterations, and the median time per hypergradient. Writes
``benchmarks/results/hypergrad_accuracy.md``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from betty_like.hypergrad import hypergradient
from betty_like.testing import chain, ridge, sample_weights

PROBLEMS = {"ridge (log lambda)": ridge, "per-sample weights": sample_weights, "3-level chain": chain}
METHODS = ["cg", "neumann", "fixed_point", "unroll", "first_order", "darts"]
UNROLL_STEPS = 200
REPEATS = 7
RESULTS = Path(__file__).parent / "results" / "hypergrad_accuracy.md"


def measure(build, method: str) -> dict[str, float]:
    steps = UNROLL_STEPS if method == "unroll" else 1
    case = build(method, unroll_steps=steps)
    case.engine.run()
    grad = case.engine.status(case.upper).gradient[f"{case.upper}.value"]
    error = float((grad - case.exact).norm() / case.exact.norm())
    cosine = float(torch.nn.functional.cosine_similarity(grad.flatten(), case.exact.flatten(), dim=0))
    infos = case.engine.status(case.upper).diagnostics
    iterations = max((i.solve.iterations for i in infos.values() if i.solve is not None), default=0)
    times = []
    for _ in range(REPEATS):
        if method in ("unroll", "first_order"):  # the cost includes the differentiable inner steps
            fresh = build(method, unroll_steps=steps)
            start = time.perf_counter()
            fresh.engine.run()
        else:
            start = time.perf_counter()
            hypergradient(case.engine.program(), case.upper)
        times.append(time.perf_counter() - start)
    return {"error": error, "cosine": cosine, "iterations": iterations, "ms": 1e3 * statistics.median(times)}


def main() -> None:
    torch.set_num_threads(1)
    lines = [
        "# Hypergradient accuracy with default settings",
        "",
        "Relative error and cosine against the exact float64 hypergradient (`torch.linalg.solve`), lower",
        f"problems at their exact solutions; `unroll` differentiates {UNROLL_STEPS} SGD steps (lr = 1/L).",
        f"Time: median of {REPEATS} hypergradients, one CPU thread (for `unroll` and `first_order`: the inner steps",
        "included, since they are what those methods differentiate).",
        "Produced by `python benchmarks/hypergrad_accuracy.py`.",
        "",
        "| problem | method | relative error | cosine | solver iterations | ms / hypergradient |",
        "|---|---|---|---|---|---|",
    ]
    for problem, build in PROBLEMS.items():
        for method in METHODS:
            r = measure(build, method)
            lines.append(
                f"| {problem} | {method} | {r['error']:.1e} | {r['cosine']:.4f} | {r['iterations']} | {r['ms']:.2f} |"
            )
            print(lines[-1], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
