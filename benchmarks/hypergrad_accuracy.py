"""Accuracy and cost of every hypergradient method on closed-form problems, with default settings.

Part 1 (bilevel): for each problem of :mod:`betty_like.testing` (ridge penalty, per-sample weights,
three-level chain) and each method, the relative error and cosine against the exact float64
hypergradient, the solver iterations, and the median time per hypergradient.

Part 2 (deeper graphs): for each case of :mod:`betty_like.testing.nested` (a-f) and a few method mixes,
the same per tested upper problem against the exact total-derivative closed form, with the time per
upper hypergradient (recomputed with :func:`betty_like.hypergrad.hypergradient` after one
``engine.run()``). For the chains, ``nested="total"`` (exact) and ``nested="partial"`` (Betty's rule) are
built side by side and timed interleaved, and their time ratio is reported.

Writes ``benchmarks/results/hypergrad_accuracy.md`` and ``hypergrad_accuracy.png``. One CPU thread.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import torch

from betty_like.hypergrad import hypergradient
from betty_like.testing import chain, ridge, sample_weights
from betty_like.testing.nested import (
    NestedCase,
    captioning,
    diamond_shared_lower,
    diamond_two_lowers,
    four_level_chain,
    learning_by_ignoring,
    three_level_chain,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROBLEMS = {"ridge (log lambda)": ridge, "per-sample weights": sample_weights, "3-level chain": chain}
METHODS = ["cg", "neumann", "fixed_point", "unroll", "first_order", "darts"]
UNROLL_STEPS = 200
REPEATS = 7
RESULTS = Path(__file__).parent / "results" / "hypergrad_accuracy.md"
PLOT = RESULTS.with_suffix(".png")


# --------------------------------------------------------------------------- part 1: bilevel
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


def bilevel_table() -> list[str]:
    lines = [
        "## 1. Bilevel problems",
        "",
        "Relative error and cosine against the exact float64 hypergradient (`torch.linalg.solve`), lower",
        f"problems at their exact solutions; `unroll` differentiates {UNROLL_STEPS} SGD steps (lr = 1/L).",
        f"Time: median of {REPEATS} hypergradients (for `unroll` and `first_order`: the inner steps",
        "included, since they are what those methods differentiate).",
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
    return lines


# --------------------------------------------------------------------------- part 2: deeper graphs
MIN_REPEATS, MAX_REPEATS = 7, 25  # per timed variant; more when a hypergradient is fast
TIME_BUDGET_S = 1.0  # per variant and upper: repeats = clamp(budget / first call, MIN_REPEATS, MAX_REPEATS)
EXACT_METHODS = ("cg", "neumann", "fixed_point")


@dataclass
class Nested:
    """One case: its builder, its lower/middle problems, the method mixes to run, and for the chains the
    builder kwargs giving Betty's partial rule (matching the case's ``partial`` closed form)."""

    label: str
    build: Callable[..., NestedCase]
    lowers: tuple[str, ...]
    mixes: list[dict[str, str]]
    partial: dict[str, Any] | None = None
    partial_label: str = ""


def _all(lowers: tuple[str, ...]) -> list[dict[str, str]]:
    return [dict.fromkeys(lowers, m) for m in EXACT_METHODS]


A = ("low", "mid")
B = ("low", "lower_mid", "upper_mid")
C = ("pretrain", "finetune")
D = ("inner1", "inner2")
F = ("lower1", "lower2")
NESTED = [
    Nested(
        "a. 3-level chain",
        three_level_chain,
        A,
        [*_all(A), {"low": "fixed_point", "mid": "cg"}, {"low": "cg", "mid": "unroll"}],
        partial={"nested": "partial"},
        partial_label="partial",
    ),
    Nested(
        "b. 4-level chain",
        four_level_chain,
        B,
        [*_all(B), {"low": "cg", "lower_mid": "neumann", "upper_mid": "fixed_point"}],
        partial={"configs": {"upper_mid": {"nested": "partial"}}},  # Betty's rule at upper_mid only
        partial_label="partial (upper_mid)",
    ),
    Nested(
        "c. learning by ignoring",
        learning_by_ignoring,
        C,
        [*_all(C), {"pretrain": "cg", "finetune": "neumann"}],
    ),
    Nested("d. captioning (NAS)", captioning, D, [*_all(D), {"inner1": "neumann", "inner2": "cg"}]),
    # one lower only, so no mix: unroll on the shared lower instead
    Nested(
        "e. diamond, shared lower", diamond_shared_lower, ("lower",), [*_all(("lower",)), {"lower": "unroll"}]
    ),
    Nested(
        "f. diamond, two lowers", diamond_two_lowers, F, [*_all(F), {"lower1": "cg", "lower2": "fixed_point"}]
    ),
]


def _mix_label(methods: dict[str, str]) -> str:
    kinds = set(methods.values())
    if len(kinds) == 1:
        return f"all {kinds.pop()}"
    return ", ".join(f"{n}={m}" for n, m in methods.items())


def _compare(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], scale: float
) -> tuple[float, float]:
    """Relative error (over the case's ``scale``) and cosine (NaN where the expected vector is ~0)."""
    g = torch.cat([got[k].detach().to(expected[k].dtype).flatten() for k in expected])
    e = torch.cat([expected[k].flatten() for k in expected])
    error = float((g - e).norm()) / scale
    cosine = (
        float("nan") if float(e.norm()) < 1e-8 * scale else float(torch.dot(g, e) / (g.norm() * e.norm()))
    )
    return error, cosine


def _iterations(case: NestedCase, upper: str) -> str:
    infos = case.engine.status(upper).diagnostics
    parts = []
    for name, info in sorted(infos.items(), key=lambda kv: case.reference.order.index(kv[0])):
        if info.solve is not None:
            parts.append(f"{name} {info.solve.iterations}")
        else:
            parts.append(f"{name} {case.problems[name].config.unroll_steps} steps")
    order = case.reference.order
    for name in order[order.index(upper) + 1 :]:  # unrolled problems below: not in the solver diagnostics
        config = case.problems[name].config
        if config.hypergrad == "unroll" and name not in infos and name not in case.reference.free:
            parts.insert(0, f"{name} {config.unroll_steps} unrolled steps")
    return ", ".join(parts)


def _spread(times: list[float]) -> tuple[float, float, float]:
    """(median, q1, q3) in ms."""
    ms = [1e3 * t for t in times]
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return statistics.median(ms), q1, q3


def _time_interleaved(cases: dict[str, NestedCase], upper: str) -> dict[str, list[float]]:
    """Times of ``hypergradient(program, upper)`` per variant, the variants alternating (order flipped each round)."""
    programs = {v: c.engine.program() for v, c in cases.items()}
    first = {}
    for v, program in programs.items():  # warm-up call, also sizes the number of repeats
        start = time.perf_counter()
        hypergradient(program, upper)
        first[v] = time.perf_counter() - start
    repeats = int(min(MAX_REPEATS, max(MIN_REPEATS, TIME_BUDGET_S / max(first.values()))))
    times: dict[str, list[float]] = {v: [] for v in programs}
    order = list(programs)
    for r in range(repeats):
        for v in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            hypergradient(programs[v], upper)
            times[v].append(time.perf_counter() - start)
    return times


def _time_runs(spec: Nested, methods: dict[str, str]) -> list[float]:
    """Whole ``engine.run()`` of freshly built engines (build excluded): the unrolled steps are the cost."""
    times = []
    for _ in range(MIN_REPEATS):
        fresh = spec.build(methods)
        start = time.perf_counter()
        fresh.engine.run()
        times.append(time.perf_counter() - start)
    return times


def measure_nested(spec: Nested, methods: dict[str, str]) -> list[dict[str, Any]]:
    unroll = "unroll" in methods.values()
    variants: dict[str, dict[str, Any]] = {"total": {}}
    if spec.partial is not None and not unroll:
        variants = {"total": {"nested": "total"}, spec.partial_label: spec.partial}
    cases = {v: spec.build(methods, **kw) for v, kw in variants.items()}
    for case in cases.values():
        case.engine.run()
    any_case = next(iter(cases.values()))
    run_times = _time_runs(spec, methods) if unroll else None
    rows = []
    for upper in any_case.uppers:
        times = {v: run_times for v in cases} if unroll else _time_interleaved(cases, upper)
        for v, case in cases.items():
            got = case.engine.status(upper).gradient
            error, cosine = _compare(got, case.exact[upper], case.scale[upper])
            betty = None
            if v != "total" and case.partial is not None and upper in case.partial:
                betty, _ = _compare(got, case.partial[upper], case.scale[upper])
            if not unroll:  # the timed recomputation must be the hypergradient the engine stepped on
                again = hypergradient(case.engine.program(), upper).gradient
                drift, _ = _compare(again, {k: t.detach() for k, t in got.items()}, case.scale[upper])
                if drift > 1e-9:
                    print(
                        f"WARNING {spec.label} {methods} {v} {upper}: recomputed hypergradient differs by {drift:.1e}"
                    )
            median, q1, q3 = _spread(times[v])
            rows.append(
                {
                    "case": spec.label,
                    "mix": _mix_label(methods),
                    "nested": v,
                    "upper": upper,
                    "error": error,
                    "cosine": cosine,
                    "betty": betty,
                    "iterations": _iterations(case, upper),
                    "ms": median,
                    "q1": q1,
                    "q3": q3,
                    "n": len(times[v]),
                    "whole_run": unroll,
                }
            )
        if len(cases) == 2:
            total, partial = rows[-2], rows[-1]
            total["ratio"] = total["ms"] / partial["ms"]
    return rows


def _fmt(x: float | None, spec: str = ".1e") -> str:
    if x is None:
        return ""
    if x != x:  # NaN
        return "n/a"
    return format(x, spec)


def nested_tables(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## 2. Deeper graphs (`betty_like.testing.nested`, cases a-f)",
        "",
        "Every level is a float64 quadratic (dimension 3) started at its exact nested solution; the engine runs",
        "once (`engine.run()`), and each tested upper problem's hypergradient (`engine.status(upper).gradient`)",
        "is compared with the exact total derivative through the nested closed forms.",
        "",
        "* **nested**: `total` (default, exact: a middle level's best response is differentiated with its total",
        "  stationarity condition, lower best responses substituted) or `partial` (Betty's rule: lower solutions",
        "  held fixed in the middle Hessian). In the 4-level chain the partial rule is set on `upper_mid` only",
        "  (`configs={'upper_mid': {'nested': 'partial'}}`), which is what the case's Betty closed form describes.",
        "* **rel. error**: `|g - g_exact| / scale`, `scale` = max(|g_exact|, |plain gradient|) as the builders define",
        "  it: a middle problem's exact hypergradient is zero at the solution, so its error is relative to the",
        "  plain gradient an engine ignoring the paths through lower solutions would return. **cosine**: against",
        "  `g_exact` (n/a where `g_exact` = 0).",
        "* **vs Betty rule**: for partial rows, error (same scale) against the closed form of Betty's rule: ~1e-16",
        "  means `partial` computes exactly Betty's approximation.",
        "* **iterations**: linear-solver iterations per lower/middle problem reported in the upper's diagnostics",
        "  (`unroll`: differentiated steps; problems a hypergradient never needs are not listed).",
        "* **ms / upper hypergradient**: median (and interquartile range, over `n` repeats) of",
        "  `hypergradient(engine.program(), upper)` after one `engine.run()`, at the solution; total and partial",
        "  engines are timed alternately (order flipped each round). Rows marked † (`unroll`) time the whole",
        "  `engine.run()` of a freshly built engine instead (build excluded): the unrolled steps are what they",
        "  differentiate, and one run produces every upper's hypergradient, so both uppers show the same time.",
        "* **total / partial**: ratio of median times, total over partial, same upper, same methods.",
        "",
        "| case | methods | nested | upper | rel. error | cosine | vs Betty rule | iterations | ms / upper hypergradient (IQR) | n | total / partial |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = f"{r['ms']:.2f} ({r['q1']:.2f}-{r['q3']:.2f}){' †' if r['whole_run'] else ''}"
        ratio = f"{r['ratio']:.1f}x" if "ratio" in r else ""
        lines.append(
            f"| {r['case']} | {r['mix']} | {r['nested']} | {r['upper']} | {_fmt(r['error'])} | "
            f"{_fmt(r['cosine'], '.6f')} | {_fmt(r['betty'])} | {r['iterations']} | {ms} | {r['n']} | {ratio} |"
        )
    lines += [
        "",
        "### Chains: the top problem, total vs partial",
        "",
        "| case | methods | ms total (IQR) | ms partial (IQR) | total / partial | rel. error total | rel. error partial |",
        "|---|---|---|---|---|---|---|",
    ]
    for total, partial in _chain_pairs(rows):
        lines.append(
            f"| {total['case']} | {total['mix']} | {total['ms']:.2f} ({total['q1']:.2f}-{total['q3']:.2f}) | "
            f"{partial['ms']:.2f} ({partial['q1']:.2f}-{partial['q3']:.2f}) | {total['ratio']:.1f}x | "
            f"{_fmt(total['error'])} | {_fmt(partial['error'])} |"
        )
    return lines


def _chain_pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(total, partial) rows of the chains' top problem."""
    pairs = []
    for i, r in enumerate(rows):
        if "ratio" in r and r["upper"] == "top":
            pairs.append((r, rows[i + 1]))
    return pairs


def plot(rows: list[dict[str, Any]]) -> None:
    pairs = _chain_pairs(rows)
    cases = list(dict.fromkeys(t["case"] for t, _ in pairs))
    fig, axes = plt.subplots(1, len(cases) + 1, figsize=(5.2 * (len(cases) + 1), 4.6))
    width = 0.38
    for ax, case in zip(axes, cases, strict=False):
        mine = [(t, p) for t, p in pairs if t["case"] == case]
        xs = range(len(mine))
        for k, (label, color) in enumerate(
            (("total (exact)", "tab:blue"), ("partial (Betty)", "tab:orange"))
        ):
            rs = [pair[k] for pair in mine]
            ms = [r["ms"] for r in rs]
            err = [[r["ms"] - r["q1"] for r in rs], [r["q3"] - r["ms"] for r in rs]]
            ax.bar(
                [x + (k - 0.5) * width for x in xs], ms, width, yerr=err, capsize=3, label=label, color=color
            )
        for x, (t, _) in zip(xs, mine, strict=True):
            ax.annotate(
                f"{t['ratio']:.0f}x", (x - 0.5 * width, t["q3"]), ha="center", va="bottom", fontsize=8
            )
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [t["mix"].replace(", ", "\n") for t, _ in mine], fontsize=7)
        ax.set_title(f"{case}: top's hypergradient")
        ax.set_ylabel("ms per upper hypergradient (median, IQR)")
        ax.legend(fontsize=8)
    ax = axes[-1]  # accuracy of the same runs
    labels = [f"{t['case'][:2]} {t['mix']}" for t, _ in pairs]
    xs = range(len(pairs))
    floor = 1e-17
    for k, (label, color) in enumerate((("total (exact)", "tab:blue"), ("partial (Betty)", "tab:orange"))):
        ax.bar(
            [x + (k - 0.5) * width for x in xs],
            [max(pair[k]["error"], floor) for pair in pairs],
            width,
            label=label,
            color=color,
        )
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [lbl.replace(", ", "\n") for lbl in labels], fontsize=6, rotation=90)
    ax.set_title("top's relative error vs the exact total derivative")
    ax.set_ylim(floor, 1e5)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__} on CPU with "
        f"`torch.set_num_threads({torch.get_num_threads()})`, Python {platform.python_version()}"
    )


def main() -> None:
    torch.set_num_threads(1)
    began = time.perf_counter()
    lines = [
        "# Hypergradient accuracy with default settings",
        "",
        f"Machine: {machine()}.",
        "The machine may be shared with other jobs: compare times within a table (total and partial are",
        "interleaved for that reason) rather than across runs.",
        "Produced by `python benchmarks/hypergrad_accuracy.py`.",
        "",
    ]
    lines += bilevel_table()
    rows = []
    for spec in NESTED:
        for methods in spec.mixes:
            new = measure_nested(spec, methods)
            for r in new:
                print(
                    f"{r['case']} | {r['mix']} | {r['nested']} | {r['upper']} | err {r['error']:.1e} "
                    f"| {r['ms']:.2f} ms {r.get('ratio', '')}",
                    flush=True,
                )
            rows += new
    lines += ["", *nested_tables(rows)]
    elapsed = time.perf_counter() - began
    lines += ["", f"Whole script: {elapsed:.0f} s. Plot: `hypergrad_accuracy.png` (chains' top problem)."]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    plot(rows)
    print(f"wrote {RESULTS} and {PLOT} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
