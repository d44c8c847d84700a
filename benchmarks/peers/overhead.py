"""Where an outer step's time goes, betty_like against betty-ml, on the reweighting MLP.

The reweighting row measures betty_like slower per outer step than Betty at equal method, on a model
whose forward and backward cost about a millisecond: framework overhead decides the ratio there. This
row profiles the same training (``peers.reweighting``, MLP, cg with 1 iteration, Betty's default)
under cProfile in both frameworks and sums the self time by where it is spent (each betty_like or
betty module, autograd's backward, other torch and Python), so that the gap is attributed to code
rather than guessed. cProfile inflates Python-heavy code; the unprofiled wall times are given too.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import re
import time
from collections import defaultdict

from peers.common import med, ratio, spread
from peers.reweighting import IMPLS, digits

METHOD, NET, OUTER = "cg1", "mlp", 40


def where(filename: str, function: str) -> str:
    """The bucket of one profiled function: its betty_like / betty module, autograd's backward, or the rest."""
    for package in ("betty_like", "betty", "torch"):
        marker = f"/{package}/"
        if marker in filename:
            inner = filename.rsplit(marker, 1)[1]
            return f"{package}/{inner if package != 'torch' else '/'.join(inner.split('/')[:2])}"
    if "run_backward" in function:
        return "autograd backward (C++)"
    if filename == "~":
        return f"built-in: {re.sub(r' at 0x[0-9a-f]+', '', function.split(' of ')[0]).strip('{}<>')}"
    return "other Python (examples, stdlib)"


def profile(impl: str, data) -> dict[str, float]:
    """Self time (ms per outer step) by bucket for ``OUTER`` outer steps of ``impl``."""
    profiler = cProfile.Profile()
    profiler.enable()
    IMPLS[impl](NET, METHOD, data, OUTER)
    profiler.disable()
    buckets: dict[str, float] = defaultdict(float)
    for (filename, _, function), (_, _, tottime, _, _) in pstats.Stats(profiler).stats.items():
        buckets[where(filename, function)] += tottime * 1e3 / OUTER
    return buckets


def verdict(times, ours, theirs) -> list[str]:
    """The gap, what the 0.67x goal asks, and which of betty_like's own costs make up the difference."""
    a, b = med(times["betty_like"]), med(times["betty-ml"])
    own = sum(v for k, v in ours.items() if k.startswith("betty_like/"))
    betty_own = sum(v for k, v in theirs.items() if k.startswith("betty/"))
    rng = ours.get("betty_like/_run_state.py", 0.0) + sum(v for k, v in ours.items() if "getstate" in k or "get_state" in k)
    return [
        f"Median unprofiled gap: {a - b:.1f} ms per outer step; the goal (<= 0.67x Betty) asks for {0.67 * b:.1f} ms, "
        f"{a - 0.67 * b:.1f} ms ({1 - 0.67 * b / a:.0%}) less than now.",
        "",
        f"Profiled, betty_like's own Python costs {own:.1f} ms per outer step against Betty's {betty_own:.1f} ms; of "
        f"it: the engine's step pipeline (`engine.py` {ours.get('betty_like/engine.py', 0.0):.1f} ms), the random-state "
        f"snapshots of each step's transaction, which make an interrupted `run()` continue exactly "
        f"(`betty_like/_run_state.py` and the generators' state reads: {rng:.1f} ms), and the non-finite guards "
        f"(`betty_like/_guards.py` {ours.get('betty_like/_guards.py', 0.0):.1f} ms).",
    ]


def section(quick: bool, repeats: int | None = None, **_) -> str:
    """Markdown section: unprofiled times, then the profiled self time by bucket for both frameworks."""
    load = os.getloadavg()[0]
    data = digits()
    for impl in IMPLS:  # warm-up
        IMPLS[impl](NET, METHOD, data, 5)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(repeats or (2 if quick else 5)):
        for impl in IMPLS:
            start = time.perf_counter()
            IMPLS[impl](NET, METHOD, data, OUTER)
            times[impl].append((time.perf_counter() - start) * 1e3 / OUTER)
    prof = {impl: profile(impl, data) for impl in IMPLS}
    ours, theirs = prof["betty_like"], prof["betty-ml"]
    top = sorted(set(ours) | set(theirs), key=lambda k: -max(ours.get(k, 0.0), theirs.get(k, 0.0)))[:16]
    lines = [
        "## Where an outer step's time goes: betty_like vs betty-ml (reweighting MLP, cg 1 iteration)",
        "",
        f"Load average at start: {load:.1f}. {OUTER} outer x 5 inner steps of the reweighting row's MLP with cg (1 "
        f"iteration). Unprofiled: betty_like {spread(times['betty_like'])} ms / outer step, betty-ml "
        f"{spread(times['betty-ml'])} ms, paired ratio {ratio(times['betty_like'], times['betty-ml'])} "
        f"({len(times['betty_like'])} interleaved repeats). Below: cProfile self time per outer step by bucket (profiled "
        f"totals: betty_like {sum(ours.values()):.1f} ms, betty-ml {sum(theirs.values()):.1f} ms; cProfile inflates "
        "Python-heavy code), the 16 largest buckets.",
        "",
        "| where | betty_like ms / outer step | betty-ml ms / outer step |",
        "|---|---|---|",
        *[f"| {k} | {ours.get(k, 0.0):.2f} | {theirs.get(k, 0.0):.2f} |" for k in top],
        "",
        *verdict(times, ours, theirs),
    ]
    return "\n".join(lines)
