"""Peer row: closed-form bilevel problems (float64), betty_like vs torchopt 0.7.3 vs higher 0.2.1.

Two penalised least-squares problems whose exact hypergradient is a pair of ``torch.linalg.solve``:
the lower problem ``min_w 0.5 mean((X w - y)^2) + 0.5 sum_j exp(lam_j) w_j^2``, the upper loss the
validation error of ``w*(lam)``. With ``H = X^T X / n + diag(exp lam)`` and ``g`` the validation
gradient at ``w*``: ``dF/dlam_j = -exp(lam_j) w*_j (H^-1 g)_j``.

- P1: ridge learning one log lambda, the data and value of ``betty_like.testing.ridge`` (d = 5);
- P2: one log penalty per feature, d = 100 from 300 rows, so a solve has something to do.

Each lower problem starts at its exact solution. Every variant computes the hypergradient of the
same upper loss at the same point:

- betty_like ``cg``, ``neumann``, ``fixed_point`` (``hypergradient(engine.program(), ...)``: the
  traversal on the engine's snapshot), and ``cg`` / ``neumann`` with ``compile_hypergrad=True``
  (the first call compiles and is timed apart); betty_like ``unroll`` (``engine.run(K)``);
- torchopt ``custom_root`` with ``solve_cg`` and ``solve_normal_cg`` (same iteration cap and
  relative tolerance as betty_like's cg), and ``MetaSGD`` through K unrolled steps;
- higher ``innerloop_ctx`` through K unrolled steps (higher has no implicit differentiation).

K unrolled SGD steps of rate 1/L from the solution are a K-term Neumann series, so ``neumann``,
``fixed_point`` (alpha = lr = 1/L, exactly K iterations: ``tol=1e-30``) and the three unrolled
variants share one truncation.

Also the "engine plain steps" row: N plain SGD steps of P1's and P2's lower problem (penalty fixed)
through ``Engine.run`` vs torchopt's functional ``sgd`` loop vs a hand ``torch.optim.SGD`` loop.

Timing: one process, one torch thread, variants interleaved per repeat after a warm-up; medians
with min-max spread, ratios paired per repeat. Run standalone (``--quick`` shrinks it) to write
``benchmarks/results/vs_peers_closed_form.md`` and ``.png``; ``section(quick)`` returns the markdown.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``peers`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from betty_like import Engine, EngineConfig, Problem, ProblemConfig  # noqa: E402
from betty_like.hypergrad import hypergradient  # noqa: E402
from betty_like.testing.closed_form import DTYPE, Scalar, ValidationLoss, linear, regression_data  # noqa: E402
from peers.common import med, ratio, spread, use_peer_paths  # noqa: E402
from peers.standalone import interleaved, run_row  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "vs_peers_closed_form.md"
PLOT = RESULTS.with_suffix(".png")


# --------------------------------------------------------------------------- the two problems
def lower_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
    """The lower objective, written once for every implementation."""
    return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (torch.exp(log_lam) * w**2).sum()


def upper_loss(w: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((xv @ w - yv) ** 2).mean()


@dataclass
class Case:
    """One closed-form problem: data, the point (log lambda, w*), the SGD rate 1/L and the exact hypergradient."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    xv: torch.Tensor
    yv: torch.Tensor
    log_lam: torch.Tensor
    w_star: torch.Tensor
    lr: float
    exact: torch.Tensor
    cg_iterations: int

    def optimality(self, w: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
        """Gradient of the lower objective, written out: torchopt traces it with functorch (no autograd.grad)."""
        return self.x.T @ (self.x @ w - self.y) / len(self.x) + torch.exp(log_lam) * w


def make_case(name: str, n: int, d: int, nv: int, log_lam: torch.Tensor, seeds: tuple[int, int], cg_iterations: int) -> Case:
    x, y = regression_data(n, d, seed=seeds[0])
    xv, yv = regression_data(nv, d, seed=seeds[1])
    hessian = x.T @ x / n + torch.diag(torch.exp(log_lam).expand(d))
    w_star = torch.linalg.solve(hessian, x.T @ y / n)
    q = torch.linalg.solve(hessian, xv.T @ (xv @ w_star - yv) / nv)
    exact = (-torch.exp(log_lam) * w_star * q).sum() if log_lam.ndim == 0 else -torch.exp(log_lam) * w_star * q
    lr = 1.0 / float(torch.linalg.eigvalsh(hessian).max())
    return Case(name, x, y, xv, yv, log_lam, w_star, lr, exact, cg_iterations)


def cases() -> list[Case]:
    """P1 is ``betty_like.testing.ridge``'s problem (same data, log lambda = -1); P2 learns 100 per-feature penalties."""
    p1 = make_case("P1 ridge, 1 log lambda, d = 5", 40, 5, 30, torch.tensor(-1.0, dtype=DTYPE), (0, 1), 10)
    p2_lam = torch.linspace(-2.0, 0.0, 100, dtype=DTYPE)
    p2 = make_case("P2 per-feature penalties, d = 100", 300, 100, 200, p2_lam, (7, 8), 60)
    return [p1, p2]


class PenalisedLower(Problem):
    """The lower problem; its penalty is the upper problem ``penalty`` (or a fixed tensor, for plain steps)."""

    fixed: torch.Tensor | None = None

    def training_step(self, batch):
        x, y = batch
        log_lam = self.penalty() if self.fixed is None else self.fixed
        return lower_loss(self.module.weight.squeeze(0), x, y, log_lam)


def build_engine(case: Case, method: str, unroll_steps: int = 1, **config) -> Engine:
    """Lower at w*, upper ``penalty`` holding log lambda with learning rate 0 (it never moves); run once."""
    module = linear(len(case.w_star), case.w_star)
    lower = PenalisedLower("inner", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=case.lr),
                           data=[(case.x, case.y)],
                           config=ProblemConfig(hypergrad=method, unroll_steps=unroll_steps, **config))
    hyper = Scalar(case.log_lam)
    upper = ValidationLoss("penalty", module=hyper, optimizer=torch.optim.SGD(hyper.parameters(), lr=0.0),
                           data=[(case.xv, case.yv)])
    engine = Engine([upper, lower], dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
                    config=EngineConfig(train_iters=unroll_steps, log_every=10**9))
    return engine.run()


# --------------------------------------------------------------------------- the variants
def ours_implicit(case: Case, method: str, iterations: int, **config) -> Callable[[], torch.Tensor]:
    """betty_like's pushing method at the solution: the traversal over the engine's current snapshot."""
    alpha = {"alpha": case.lr} if method == "neumann" else {}
    tol = 1e-12 if method == "cg" else 1e-30  # the series: all ``iterations`` terms, as the unrolled peers take them
    engine = build_engine(case, method, iterations=iterations, tol=tol, **alpha, **config)
    return lambda: hypergradient(engine.program(), "penalty").gradient["penalty.value"]


def ours_unroll(case: Case, steps: int) -> Callable[[], torch.Tensor]:
    engine = build_engine(case, "unroll", unroll_steps=steps)

    def run() -> torch.Tensor:
        engine.run(steps)
        return engine.status("penalty").gradient["penalty.value"]

    return run


def torchopt_root(case: Case, solver: str, iterations: int) -> Callable[[], torch.Tensor]:
    """``custom_root`` around the (known) inner solution; only the implicit backward is computed."""
    import torchopt.linear_solve as ls
    from torchopt.diff.implicit import custom_root

    solve_fn = {"cg": ls.solve_cg, "normal_cg": ls.solve_normal_cg}[solver](maxiter=iterations, rtol=1e-12)

    @custom_root(case.optimality, argnums=1, solve=solve_fn)
    def solve(w0, log_lam):
        return case.w_star.clone()

    def run() -> torch.Tensor:
        log_lam = case.log_lam.clone().requires_grad_(True)
        w = solve(torch.zeros_like(case.w_star), log_lam)
        return torch.autograd.grad(upper_loss(w, case.xv, case.yv), log_lam)[0]

    return run


def _module_at_solution(case: Case) -> torch.nn.Module:
    return linear(len(case.w_star), case.w_star)


def torchopt_metasgd(case: Case, steps: int) -> Callable[[], torch.Tensor]:
    import torchopt

    def run() -> torch.Tensor:
        net = _module_at_solution(case)
        log_lam = case.log_lam.clone().requires_grad_(True)
        opt = torchopt.MetaSGD(net, lr=case.lr)
        for _ in range(steps):
            opt.step(lower_loss(net.weight.squeeze(0), case.x, case.y, log_lam))
        return torch.autograd.grad(upper_loss(net.weight.squeeze(0), case.xv, case.yv), log_lam)[0]

    return run


def higher_unroll(case: Case, steps: int) -> Callable[[], torch.Tensor]:
    import higher

    def run() -> torch.Tensor:
        net = _module_at_solution(case)
        log_lam = case.log_lam.clone().requires_grad_(True)
        opt = torch.optim.SGD(net.parameters(), lr=case.lr)
        with higher.innerloop_ctx(net, opt, copy_initial_weights=True) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(lower_loss(fnet.weight.squeeze(0), case.x, case.y, log_lam))
            return torch.autograd.grad(upper_loss(fnet.weight.squeeze(0), case.xv, case.yv), log_lam)[0]

    return run


def rel_error(g: torch.Tensor, exact: torch.Tensor) -> float:
    return float((g.detach() - exact).norm() / exact.norm())


# --------------------------------------------------------------------------- hypergradient rows
TORCHOPT_CG, TORCHOPT_NCG = "torchopt custom_root + solve_cg", "torchopt custom_root + solve_normal_cg"
TORCHOPT_META, HIGHER = "torchopt MetaSGD", "higher innerloop_ctx"


def hypergradient_rows(case: Case, steps: int, repeats: int, compiled: tuple[str, ...]) -> dict:
    """Times, errors and compile times of every variant on one problem."""
    it = case.cg_iterations
    fns = {
        f"betty_like cg ({it} it.)": ours_implicit(case, "cg", it),
        f"betty_like neumann ({steps} it.)": ours_implicit(case, "neumann", steps),
        f"betty_like fixed_point ({steps} it.)": ours_implicit(case, "fixed_point", steps),
        f"betty_like unroll (K = {steps})": ours_unroll(case, steps),
        TORCHOPT_CG: torchopt_root(case, "cg", it),
        TORCHOPT_NCG: torchopt_root(case, "normal_cg", it),
        TORCHOPT_META: torchopt_metasgd(case, steps),
        HIGHER: higher_unroll(case, steps),
    }
    compile_s = {}
    for method in compiled:
        iterations = it if method == "cg" else steps
        name = f"betty_like {method} ({iterations} it.), compile_hypergrad"
        start = time.perf_counter()  # the engine's first step takes a hypergradient: the products are captured there
        fns[name] = ours_implicit(case, method, iterations, compile_hypergrad=True)
        compile_s[name] = time.perf_counter() - start
    errors = {name: rel_error(fn(), case.exact) for name, fn in fns.items()}
    times = interleaved(fns, repeats)
    print(f"  {case.name}: " + ", ".join(f"{n} {1e3 * med(t):.2f} ms" for n, t in times.items()), flush=True)
    return {"times": times, "errors": errors, "compile_s": compile_s}


def _peer_of(name: str) -> tuple[str, ...]:
    """The peers that compute the same thing as a betty_like row: cg against torchopt's implicit solves, the
    truncated series (neumann, fixed_point, unroll) against the unrolled peers."""
    if name.startswith("betty_like cg"):
        return (TORCHOPT_CG, TORCHOPT_NCG)
    return (TORCHOPT_META, HIGHER)


def goal_lines(case: Case, r: dict) -> list[str]:
    """The three goals of issue 19 item 6 on one problem: speed vs like peers, compiled speed-up, accuracy."""
    t, e = r["times"], r["errors"]
    ours = [n for n in t if n.startswith("betty_like")]
    pair = lambda a, b: med([x / y for x, y in zip(t[a], t[b], strict=True)])  # noqa: E731
    worst = {o: max((pair(o, p), p) for p in _peer_of(o)) for o in ours}
    missed = {o: w for o, w in worst.items() if w[0] > 1}
    lines = [f"- {case.name}, speed (each betty_like row / the peers computing the same thing, paired median): "
             + ("met on every row." if not missed else "missed on " + "; ".join(
                 f"{o} ({ratio(t[o], t[w[1]])}x {w[1]})" for o, w in missed.items()) + ".")]
    cg_eager = next(n for n in ours if n.startswith("betty_like cg") and "compile" not in n)
    cg_comp = next((n for n in ours if n.startswith("betty_like cg") and "compile" in n), None)
    if cg_comp:
        speed = {p: 1 / pair(cg_comp, p) for p in (TORCHOPT_CG, TORCHOPT_NCG, cg_eager)}
        lines.append(f"- {case.name}, compile_hypergrad: cg speed-up over torchopt solve_cg {speed[TORCHOPT_CG]:.2f}x, "
                     f"over solve_normal_cg {speed[TORCHOPT_NCG]:.2f}x, over eager betty_like cg {speed[cg_eager]:.2f}x "
                     "(goal >= 3x over the peers: " + ("met" if speed[TORCHOPT_CG] >= 3 else
                                                       f"missed by {3 / speed[TORCHOPT_CG]:.1f}x") + ").")
    worse = [f"{o} {e[o]:.1e} vs {p} {e[p]:.1e}" for o in ours for p in _peer_of(o) if e[o] > 1.1 * e[p] + 1e-15]
    lines.append(f"- {case.name}, accuracy (rel. error of each betty_like row vs the peers computing the same thing, "
                 "10 % + 1e-15 slack): " + ("met on every row." if not worse else "missed: " + "; ".join(worse) + "."))
    return lines


def table(case: Case, r: dict) -> list[str]:
    t, e = r["times"], r["errors"]
    lines = [f"### {case.name}", "",
             "| implementation | ms / hypergradient | ratio / torchopt solve_cg | ratio / higher | rel. error vs exact |",
             "|---|---|---|---|---|"]
    for name, ts in t.items():
        lines.append(f"| {name} | {spread([1e3 * s for s in ts])} | {ratio(ts, t[TORCHOPT_CG])} | {ratio(ts, t[HIGHER])} | {e[name]:.1e} |")
    if r["compile_s"]:
        lines += ["", "Compile time (engine build and its first step, whose hypergradient captures the products; excluded above): "
                  + ", ".join(f"{n.split(', ')[0]} {s:.1f} s" for n, s in r["compile_s"].items()) + "."]
    return [*lines, ""]


# --------------------------------------------------------------------------- engine plain steps
def plain_steps(case: Case, steps: int, repeats: int) -> dict[str, list[float]]:
    """N plain SGD steps of the lower problem (penalty fixed): Engine vs torchopt's functional loop vs a hand loop."""
    import torchopt

    data = (case.x, case.y)
    lam = case.log_lam

    module = linear(len(case.w_star))
    lower = PenalisedLower("inner", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=case.lr),
                           data=[data])
    lower.fixed = lam
    engine = Engine([lower], config=EngineConfig(train_iters=1, log_every=10**9))

    def engine_fn() -> None:
        engine.run(steps)

    def torchopt_fn() -> None:
        w = torch.zeros_like(case.w_star).requires_grad_(True)
        opt = torchopt.sgd(lr=case.lr)
        state = opt.init((w,))
        for _ in range(steps):
            grads = torch.autograd.grad(lower_loss(w, *data, lam), (w,))
            updates, state = opt.update(grads, state, inplace=False)
            (w,) = torchopt.apply_updates((w,), updates, inplace=False)

    def hand_fn() -> None:
        module = linear(len(case.w_star))
        opt = torch.optim.SGD(module.parameters(), lr=case.lr)
        for _ in range(steps):
            opt.zero_grad()
            lower_loss(module.weight.squeeze(0), *data, lam).backward()
            opt.step()

    return interleaved({"engine": engine_fn, "torchopt functional sgd": torchopt_fn, "hand loop": hand_fn}, repeats, 1)


def plain_table(results: dict[str, dict[str, list[float]]], steps: int) -> list[str]:
    lines = [f"## Engine plain steps ({steps} SGD steps of the lower problem, penalty fixed)", "",
             "`engine.run(N)` on `Engine([lower])` (built once, outside the timed calls) vs torchopt `sgd` + `apply_updates` over a "
             "leaf tensor vs `torch.optim.SGD` with `backward()` on a module.", "",
             "| problem | implementation | µs / step | ratio engine / this |", "|---|---|---|---|"]
    for name, t in results.items():
        for impl, ts in t.items():
            lines.append(f"| {name} | {impl} | {spread([1e6 * s / steps for s in ts])} | {ratio(t['engine'], ts)} |")
    return [*lines, ""]


NOTES = [
    "Why rows miss (from cProfile runs of P2 made while writing this row, same machine; see the tables for the sizes):",
    "",
    "- betty_like cg vs torchopt solve_cg: the products cost the same (one double-backward each); betty_like's "
    "conjugate gradient also keeps diagnostics every iteration (residual history, finiteness and curvature "
    "verdicts, dtype casts: ~0.2-0.4 ms per iteration, ~25 % of a P2 solve), which torchopt's `linalg.cg` does not "
    "compute. The two are within each other's spread on this loaded machine.",
    "- betty_like unroll vs MetaSGD / higher: `engine.run(K)` takes K engine steps, and each engine step costs "
    "~1-2 ms more than a bare differentiable step on these tiny problems (see the plain-steps table below and "
    "`benchmarks/results/engine_overhead.md`); the series it computes is the same to 1e-15.",
    "- compile_hypergrad: a captured product is one call into a `torch.compile`d function whose Python-side "
    "wrapper and guards cost ~0.3 ms against ~0.1 ms of kernel for d <= 100, so at these sizes compiled products "
    "are no faster than eager ones; the >= 3x goal cannot be met on problems this small. The first capture takes "
    "~20 s; later ones in the same process reuse inductor's caches (a few s).",
]


# --------------------------------------------------------------------------- section, plot, script
def section(quick: bool, **_) -> str:
    """The markdown section of this row (runs the measurements)."""
    use_peer_paths()
    torch.set_num_threads(1)
    steps, repeats, plain_n = (30, 7, 50) if quick else (100, 21, 200)
    compiled = ("cg",) if quick else ("cg", "neumann")
    load = os.getloadavg()
    start = time.perf_counter()
    results = {case.name: (case, hypergradient_rows(case, steps, repeats, compiled)) for case in cases()}
    plain = {case.name.split(",")[0]: plain_steps(case, plain_n, repeats) for case in cases()}
    lines = [
        "## Closed-form bilevel problems (float64): betty_like vs torchopt vs higher", "",
        f"`benchmarks/peers/closed_form.py`{' --quick' if quick else ''}: lower at its exact solution, penalised least "
        "squares, exact hypergradient by `torch.linalg.solve`. cg: betty_like and torchopt both capped at the row's "
        f"iterations with relative tolerance 1e-12; neumann / fixed_point (alpha = lr = 1/L, all K terms) and the unrolled variants "
        f"(K = {steps} SGD steps of rate 1/L from the solution) are the same truncated series. {repeats} interleaved "
        f"repeats after a warm-up; ratios betty_like / peer paired per repeat (< 1: faster). One torch thread, torch "
        f"{torch.__version__}, {platform.machine()}, shared 2-core CPU, load average {load[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (absolute times move with the load; read the paired ratios).", "",
    ]
    for case, r in results.values():
        lines += table(case, r)
    lines += ["Goals (issue 19 item 6):", ""]
    for case, r in results.values():
        lines += goal_lines(case, r)
    lines += ["", *NOTES, "", *plain_table(plain, plain_n), f"Row run time: {time.perf_counter() - start:.0f} s.", ""]
    plot({case.name.split(",")[0]: r for case, r in results.values()})
    return "\n".join(lines)


def plot(results: dict[str, dict]) -> None:
    """Median time ratio of every betty_like row over the faster peer computing the same thing, per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 3.5))
    for ax, (name, r) in zip(axes, results.items(), strict=True):
        t = r["times"]
        rows = {}
        for n in (n for n in t if n.startswith("betty_like")):
            peer = min(_peer_of(n), key=lambda p: med(t[p]))
            rows[f"{n}\n/ {peer}"] = med([a / b for a, b in zip(t[n], t[peer], strict=True)])
        labels = list(rows)
        ax.barh(labels, [rows[n] for n in labels], color=["tab:green" if rows[n] <= 1 else "tab:red" for n in labels])
        ax.axvline(1.0, color="k", lw=1)
        ax.set_title(name)
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("time ratio betty_like / peer (paired median; < 1 faster)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main(argv: list[str] | None = None) -> None:
    run_row(section, RESULTS, PLOT, __doc__.splitlines()[0], "fewer repeats, shorter unrolls, cg compiled only", argv)


if __name__ == "__main__":
    main()
