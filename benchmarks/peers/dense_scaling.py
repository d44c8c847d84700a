"""Peer row: implicit hypergradient cost from 10^3 to 10^6 lower parameters, betty_like cg vs a dense solve.

The lower problem is a tanh MLP 32-h-h-10 (float32) whose weights are one flat vector, so h sets
the size: h = 16, 80, 296, 980 give about 10^3, 10^4, 10^5, 10^6 parameters. Its loss is the
per-example cross-entropy on a 64-row batch, weighted by the sigmoid of the upper problem's 64
logits, plus a small weight decay; the upper loss is the cross-entropy on another 64-row batch.
The hypergradient is taken at the initial weights (no lower step), the same point for both:

- betty_like ``cg`` with a fixed number of iterations (``tol=1e-30``) and ``damping=1.0``:
  ``hypergradient(engine.program(), "upper")``, Hessian-vector products only, O(d) memory each;
- dense: the full Hessian (d Hessian-vector products, batched with ``vmap``), ``+ I``,
  ``torch.linalg.solve`` (O(d^2) memory, O(d^3) time), and the same mixed-derivative product. Only
  where it fits (10^4 is 400 MB in float32; 10^5 would be 40 GB).

Time: a fresh interpreter per size runs the variants interleaved (warm-up, then repeats; medians
with spread, ratio cg / dense paired per repeat). Peak memory: a fresh interpreter per size and
variant (``child_output``), the peak resident set (``maxrss_mb``) after one hypergradient minus the
peak before it (model, data and engine built). Error: cg vs dense (both float32) and both vs a
float64 dense solve where one is run. One torch thread. Run standalone (``--quick`` drops 10^6 and
the float64 reference at 10^4) to write ``benchmarks/results/vs_peers_dense_scaling.md`` and ``.png``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

if __package__ in (None, ""):  # run as a script (and as a child): make ``peers`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from betty_like import Engine, EngineConfig, Problem, ProblemConfig  # noqa: E402
from betty_like.hypergrad import hypergradient  # noqa: E402
from betty_like.testing.closed_form import Scalar  # noqa: E402
from peers.common import child_output, maxrss_mb, med, ratio, spread  # noqa: E402
from peers.standalone import interleaved, run_row  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "vs_peers_dense_scaling.md"
PLOT = RESULTS.with_suffix(".png")
WIDTHS = {3: 16, 4: 80, 5: 296, 6: 980}  # log10(size) -> hidden width of the 32-h-h-10 MLP
BATCH, CG_ITERATIONS, DAMPING, DECAY = 64, 20, 1.0, 1e-3


# --------------------------------------------------------------------------- the problem
def shapes(h: int) -> list[tuple[int, ...]]:
    return [(h, 32), (h,), (h, h), (h,), (10, h), (10,)]


def mlp(theta: torch.Tensor, x: torch.Tensor, h: int) -> torch.Tensor:
    """The MLP with its weights read from the flat vector ``theta`` (so the Hessian is one d x d matrix)."""
    parts, start = [], 0
    for shape in shapes(h):
        size = int(torch.Size(shape).numel())
        parts.append(theta[start : start + size].view(shape))
        start += size
    w1, b1, w2, b2, w3, b3 = parts
    return F.linear(torch.tanh(F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)), w3, b3)


class FlatMLP(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.h = h
        g = torch.Generator().manual_seed(0)
        chunks = [torch.randn(s, generator=g) / (s[-1] ** 0.5 if len(s) == 2 else 10.0) for s in shapes(h)]
        self.theta = nn.Parameter(torch.cat([c.flatten() for c in chunks]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp(self.theta, x, self.h)


def lower_loss(theta, logits, batch, h):
    x, y = batch
    weights = torch.sigmoid(logits)
    return (weights * F.cross_entropy(mlp(theta, x, h), y, reduction="none")).mean() + 0.5 * DECAY * (theta**2).sum()


def upper_loss(theta, batch, h):
    return F.cross_entropy(mlp(theta, batch[0], h), batch[1])


class Lower(Problem):
    def training_step(self, batch):
        return lower_loss(self.module.theta, self.upper(), batch, self.module.h)


class Upper(Problem):
    def training_step(self, batch):
        return F.cross_entropy(self.lower(batch[0]), batch[1])


def data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(BATCH, 32, generator=g), torch.randn(BATCH, 32, generator=g)
    return (x, torch.randint(0, 10, (BATCH,), generator=g)), (xv, torch.randint(0, 10, (BATCH,), generator=g))


def build(power: int) -> Engine:
    """The bilevel engine at its initial point; nothing is run (the traversal draws each batch when it needs it)."""
    train, valid = data()
    net = FlatMLP(WIDTHS[power])
    logits = Scalar(torch.linspace(-1.0, 1.0, BATCH)).float()
    lower = Lower("lower", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=[train],
                  config=ProblemConfig(hypergrad="cg", iterations=CG_ITERATIONS, tol=1e-30, damping=DAMPING))
    upper = Upper("upper", module=logits, optimizer=torch.optim.SGD(logits.parameters(), lr=0.0), data=[valid])
    return Engine([upper, lower], dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
                  config=EngineConfig(train_iters=1, log_every=10**9))


def ours(engine: Engine) -> torch.Tensor:
    return hypergradient(engine.program(), "upper").gradient["upper.value"]


def dense(engine: Engine, dtype: torch.dtype = torch.float32, chunk: int = 256) -> torch.Tensor:
    """``-d/dlogits <grad_theta f, (H + I)^-1 grad_theta F>`` with H built column by column and solved densely."""
    h = engine.problems["lower"].module.h
    theta = engine.problems["lower"].module.theta.detach().to(dtype)
    logits = engine.problems["upper"].module.value.detach().to(dtype)
    train, valid = ((t.to(dtype) if t.is_floating_point() else t for t in b) for b in data())
    train, valid = tuple(train), tuple(valid)
    gradient = grad(lambda t: lower_loss(t, logits, train, h))

    def hvp(u):
        return jvp(gradient, (theta,), (u,))[1]

    d = theta.numel()
    eye = torch.eye(d, dtype=dtype)
    hessian = torch.cat([vmap(hvp)(eye[i : i + chunk]) for i in range(0, d, chunk)])
    del eye
    hessian.diagonal().add_(DAMPING)
    v = torch.linalg.solve(hessian, grad(lambda t: upper_loss(t, valid, h))(theta))
    del hessian
    lam = logits.clone().requires_grad_(True)
    return -torch.autograd.grad(grad(lambda t: lower_loss(t, lam, train, h))(theta) @ v, lam)[0]


VARIANTS = {"betty_like cg": ours, "dense solve": dense}


# --------------------------------------------------------------------------- children
def child(args: list[str]) -> str:
    """``mem POWER VARIANT`` -> peak MB of one hypergradient; ``time POWER REPEATS DENSE F64`` -> times, errors."""
    torch.set_num_threads(1)
    mode, power = args[0], int(args[1])
    engine = build(power)
    if mode == "mem":
        base = maxrss_mb()
        VARIANTS[args[2]](engine)
        return json.dumps({"mem": maxrss_mb() - base})
    repeats, with_dense, with_f64 = int(args[2]), args[3] == "1", args[4] == "1"
    fns = {name: (lambda f=fn: f(engine)) for name, fn in VARIANTS.items() if with_dense or name != "dense solve"}
    out = {"d": engine.problems["lower"].module.theta.numel(), "grads": {n: fn().tolist() for n, fn in fns.items()}}
    out["times"] = interleaved(fns, repeats, warmup=0)  # the gradients above were the warm-up
    if with_f64:
        out["grads"]["float64 dense"] = dense(engine, torch.float64).tolist()
    return json.dumps(out)


def exponent(small: dict, large: dict, name: str, what: str) -> float:
    """k in cost ~ d^k from two sizes (medians for times, single readings for memory)."""
    a, b = small[what][name], large[what][name]
    a, b = (med(a), med(b)) if what == "times" else (max(a, 1.0), max(b, 1.0))
    return math.log(b / a) / math.log(large["d"] / small["d"])


def rel(a: list[float], b: list[float]) -> float:
    a_t, b_t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a_t - b_t).norm() / b_t.norm())


def measure(power: int, repeats: int, dense_max: int, f64_max: int) -> dict:
    script = Path(__file__).resolve()
    with_dense, with_f64 = power <= dense_max, power <= f64_max
    r = json.loads(child_output(script, ["time", str(power), str(repeats), str(int(with_dense)), str(int(with_f64))]))
    r["mem"] = {name: json.loads(child_output(script, ["mem", str(power), name]))["mem"]
                for name in VARIANTS if with_dense or name != "dense solve"}
    print(f"  d = {r['d']}: " + ", ".join(f"{n} {med(t):.3g} s, {r['mem'][n]:.0f} MB" for n, t in r["times"].items()),
          flush=True)
    return r


# --------------------------------------------------------------------------- section, plot, script
def section(quick: bool, **_) -> str:
    """The markdown section of this row (runs the measurements in child interpreters)."""
    powers, dense_max, f64_max = ((3, 4, 5), 4, 3) if quick else ((3, 4, 5, 6), 4, 4)
    repeats = {3: 5, 4: 2, 5: 3, 6: 2}  # a dense solve at 10^4 takes most of a minute
    load, start = os.getloadavg(), time.perf_counter()
    results = {p: measure(p, repeats[p], dense_max, f64_max) for p in powers}
    cg, dn = "betty_like cg", "dense solve"
    lines = [
        "## Implicit hypergradient vs lower size: betty_like cg vs a dense solve (float32)", "",
        f"`benchmarks/peers/dense_scaling.py`{' --quick' if quick else ''}: tanh MLP 32-h-h-10 as one flat weight vector, "
        f"{BATCH}-row batches, {BATCH} upper per-example weight logits, hypergradient at the initial weights. cg: "
        f"{CG_ITERATIONS} iterations (tol 1e-30), damping {DAMPING}; dense: full Hessian from d batched HVPs, + I, "
        "`torch.linalg.solve`, only up to 10^4 (10^5 would need a 40 GB matrix). Time: a fresh interpreter per size, "
        f"variants interleaved, {repeats[3]} repeats at 10^3, {repeats[4]} at 10^4, {repeats[5]} at 10^5, {repeats[6]} at 10^6, after a warm-up; memory: peak RSS increase of one "
        "hypergradient in a fresh interpreter per size and variant. One torch thread, torch "
        f"{torch.__version__}, {platform.machine()}, shared 2-core CPU, load average {load[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end.", "",
        "| lower params d | cg s / hypergradient | dense s / hypergradient | dense / cg (paired) | cg peak MB | "
        "dense peak MB | rel. diff cg vs dense | cg vs float64 dense | dense fp32 vs float64 dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        t, g, m = r["times"], r["grads"], r["mem"]
        has_dense, ref = dn in t, g.get("float64 dense")
        lines.append(
            f"| {r['d']:,} | {spread(t[cg])} | {spread(t[dn]) if has_dense else '-'} | "
            f"{ratio(t[dn], t[cg]) if has_dense else '-'} | {m[cg]:.0f} | {f'{m[dn]:.0f}' if has_dense else '-'} | "
            f"{f'{rel(g[cg], g[dn]):.1e}' if has_dense else '-'} | {f'{rel(g[cg], ref):.1e}' if ref else '-'} | "
            f"{f'{rel(g[dn], ref):.1e}' if ref and has_dense else '-'} |")
    first, last = results[powers[0]], results[powers[-1]]
    dense_rows = [r for r in results.values() if dn in r["times"]]
    lines += ["", f"Measured growth exponents (time ~ d^k between the smallest and largest size run): cg "
              f"k = {exponent(first, last, cg, 'times'):.2f} in time, {exponent(first, last, cg, 'mem'):.2f} in peak memory "
              f"({CG_ITERATIONS} products, each O(d) here: a 64-row batch through a width-h MLP); dense k = "
              f"{exponent(dense_rows[0], dense_rows[-1], dn, 'times'):.2f} in time, "
              f"{exponent(dense_rows[0], dense_rows[-1], dn, 'mem'):.2f} in memory (d products to build H, O(d^2) "
              "memory, O(d^3) factorisation). At 10^6 a dense float32 Hessian alone would be 4 TB.",
              f"Row run time: {time.perf_counter() - start:.0f} s.", ""]
    plot(results)
    return "\n".join(lines)


def plot(results: dict[int, dict]) -> None:
    """Time and peak memory against d, log-log, cg and dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in VARIANTS:
        rows = [r for r in results.values() if name in r["times"]]
        ds = [r["d"] for r in rows]
        ax_t.plot(ds, [med(r["times"][name]) for r in rows], "o-", label=name)
        ax_m.plot(ds, [max(r["mem"][name], 1e-1) for r in rows], "o-", label=name)
    for ax, label in ((ax_t, "s / hypergradient (median)"), (ax_m, "peak RSS increase, MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("lower parameters d")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        print(child(argv[1:]))
        return
    run_row(section, RESULTS, PLOT, __doc__.splitlines()[0], "10^3 to 10^5 only, float64 reference at 10^3 only", argv)


if __name__ == "__main__":
    main()
