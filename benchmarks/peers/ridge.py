"""Implicit hypergradient at the solution of the closed-form ridge problem: betty_like cg vs torchopt.

Both solve ``H v = grad`` by conjugate gradient at the exact inner solution, so the row compares the
cost of one implicit hypergradient (graph traversal and solver overhead on a tiny d = 5 problem) and
its error against the closed form. torchopt's ``custom_root`` traces the optimality function with
functorch, so the ridge gradient is written out instead of taken with ``torch.autograd.grad``.
"""

from __future__ import annotations

import os
import time

import torch

from peers.common import ratio, spread


def measure(repeats: int, iterations: int = 10) -> dict:
    """Interleaved timings and relative errors against the exact hypergradient, for both implementations."""
    from torchopt.diff.implicit import custom_root
    from torchopt.linear_solve import solve_cg

    from betty_like.hypergrad import hypergradient
    from betty_like.testing import ridge
    from betty_like.testing.closed_form import regression_data

    case = ridge("cg", iterations=iterations)
    case.engine.run()
    ours = case.engine.status("penalty").gradient["penalty.value"]
    exact = case.exact
    x, y = regression_data(40, 5, seed=0)
    xv, yv = regression_data(30, 5, seed=1)

    def optimality(w, log_lam):  # gradient of the inner objective, written out (torchopt traces it with functorch)
        return x.T @ (x @ w - y) / len(x) + torch.exp(log_lam) * w

    @custom_root(optimality, argnums=1, solve=solve_cg(maxiter=iterations))
    def solve(w0, log_lam):  # the solver itself is not differentiated: exact normal equations
        with torch.no_grad():
            h = x.T @ x / len(x) + torch.exp(log_lam) * torch.eye(5, dtype=x.dtype)
            return torch.linalg.solve(h, x.T @ y / len(x))

    def theirs():
        log_lam = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
        w = solve(torch.zeros(5, dtype=torch.float64), log_lam)
        return torch.autograd.grad(0.5 * ((xv @ w - yv) ** 2).mean(), log_lam)[0]

    def ours_fn():
        return hypergradient(case.engine.program(), "penalty")

    tg = theirs()
    for _ in range(5):  # warm-up
        ours_fn(), theirs()
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        for fn, times in ((ours_fn, t_ours), (theirs, t_theirs)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)

    def err(g):
        return float((g - exact).abs() / exact.abs())

    return {"ours": {"t": t_ours, "err": err(ours)}, "torchopt": {"t": t_theirs, "err": err(tg)}, "iterations": iterations}


def section(quick: bool, repeats: int | None = None, **_) -> str:
    """Markdown section: ms per hypergradient, paired ratio, relative error against the closed form."""
    load = os.getloadavg()[0]
    r = measure(repeats or (10 if quick else 50))
    ms = {k: [1e3 * t for t in r[k]["t"]] for k in ("ours", "torchopt")}
    return "\n".join([
        "## Implicit hypergradient at the solution: closed-form ridge (d = 5, learn log lambda)",
        "",
        f"Load average at start: {load:.1f}. Both solve H v = grad with at most {r['iterations']} CG iterations, each "
        "with its default tolerance. betty_like: `hypergradient(program)` on `betty_like.testing.ridge('cg')` (inner at "
        "its exact solution); torchopt: `custom_root(optimality, solve=solve_cg)` around an exact inner solve. Time per "
        f"hypergradient (torchopt's includes its inner solve, a 5x5 `linalg.solve`), {len(ms['ours'])} interleaved repeats.",
        "",
        "| implementation | ms / hypergradient | ratio ours/torchopt | rel. error vs exact |",
        "|---|---|---|---|",
        f"| betty_like cg | {spread(ms['ours'])} | {ratio(ms['ours'], ms['torchopt'])} | {r['ours']['err']:.1e} |",
        f"| torchopt custom_root + solve_cg | {spread(ms['torchopt'])} | - | {r['torchopt']['err']:.1e} |",
    ])
