"""betty_like side by side with its peers: betty-ml 0.2.1, torchopt 0.7.3 and higher 0.2.1.

Runs in its own virtual environment (see ``benchmarks/README_peers.md``); betty-ml is loaded from an
unpacked wheel folder (``BETTY_PATH``, default ``.venv-peers/betty``) since its metadata refuses Python 3.11.

Rows (one process, ``torch.set_num_threads(1)``, variants interleaved and repeated; medians with the
min-max spread; ratios betty_like / peer, paired per repeat, below 1 = betty_like faster or smaller):

1. Meta-Weight-Net on digits (MLP 64-32-10), 100 outer x 5 inner steps, betty-ml vs betty_like for
   darts, neumann, cg: time per outer step, peak memory, final test accuracy, and the relative difference
   of the first hypergradient (same init, same batches) between the two.
2. Meta-gradient through K unrolled SGD steps (MLP 64-256-256-10, batch 512, float64): betty_like unroll
   vs torchopt ``MetaSGD`` vs higher ``innerloop_ctx``: time, peak memory, max abs meta-gradient difference.
3. Implicit hypergradient at the solution of the closed-form ridge problem: betty_like cg vs torchopt
   ``custom_root`` + ``solve_cg``: time and relative error against the exact closed form.

Peak memory: the increase of the process's peak resident set size (``VmHWM``, the ``getrusage`` peak of
the new address space) over the run, in a fresh subprocess per configuration (baseline taken after
imports, data and model are built).

Writes ``benchmarks/results/vs_peers.md`` and ``vs_peers.png``. ``--quick`` shrinks everything.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peers.common import child_output, maxrss_mb, med, ratio, spread, use_peer_paths
from torch import nn

use_peer_paths()

RESULTS = Path(__file__).parent / "results" / "vs_peers.md"
PLOT = RESULTS.with_suffix(".png")
MEMORY_PLOT = RESULTS.with_name("vs_peers_memory.png")
QUICK = False


# =========================================================================== row 1: Meta-Weight-Net
R1 = {"outer": 100, "inner": 5, "iterations": 5, "lr": 0.1, "batch": 100}


def mwn_data():
    from meta_weight_net import meta_weight_digits

    return meta_weight_digits(1, 100, 500, None, "uniform", 0.4)


def mwn_modules(seed=1):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    from meta_weight_net import WeightNet

    return net, WeightNet(100, 1)


def inner_loss(module, weight_net, batch):
    x, y = batch
    losses = F.cross_entropy(module(x), y, reduction="none").unsqueeze(1)
    return (weight_net(losses.detach()) * losses).mean()


LABEL = {"cg": f"cg ({R1['iterations']} it.)", "cg1": "cg (1 it., Betty's default)"}


def run_ours_mwn(method, data, outer_steps, capture):
    from reweight_digits import shuffled_batches

    from betty_like import Engine, EngineConfig, Problem, ProblemConfig

    train, meta, _ = data[0], data[1], data[2]
    net, wnet = mwn_modules()

    class Inner(Problem):
        def training_step(self, batch):
            return inner_loss(self.module, self.outer, batch)

    class Outer(Problem):
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.inner(x), y)

    its = 1 if method == "cg1" else R1["iterations"]
    method = "cg" if method == "cg1" else method
    extra = {}
    if method == "darts":
        extra = {"darts_scale": "identity"}
    elif method == "neumann":
        extra = {"iterations": R1["iterations"], "alpha": R1["lr"], "tol": 1e-30}
    elif method == "cg":
        extra = {"iterations": its, "tol": 1e-30}
    inner = Inner(
        "inner",
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=R1["lr"], momentum=0.9, weight_decay=5e-4),
        data=shuffled_batches(train[0], train[1], R1["batch"], 1),
        config=ProblemConfig(hypergrad=method, unroll_steps=R1["inner"], **extra),
    )
    outer = Outer(
        "outer",
        module=wnet,
        optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3, weight_decay=1e-4),
        data=shuffled_batches(meta[0], meta[1], R1["batch"], 2),
    )
    iters = R1["inner"] if capture else outer_steps * R1["inner"]  # capture: the first hypergradient only
    engine = Engine(
        [outer, inner],
        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        config=EngineConfig(train_iters=iters, log_every=10**9),
    )
    engine.run()
    grad = engine.status("outer").gradient
    first = torch.cat([grad[f"outer.{n}"].flatten() for n, _ in wnet.named_parameters()]) if capture else None
    return net, first


def run_betty_mwn(method, data, outer_steps, capture):
    import logging

    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem
    from reweight_digits import shuffled_batches

    logging.disable(logging.INFO)  # Betty logs every engine start and finish
    train, meta = data[0], data[1]
    net, wnet = mwn_modules()
    captured = []

    class Inner(ImplicitProblem):
        def training_step(self, batch):
            return inner_loss(self.module, self.outer, batch)

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.inner(x), y)

        def grad_callback(self):
            if not captured:
                captured.append(torch.cat([p.grad.detach().flatten().clone() for p in self.module.parameters()]))

    its = 1 if method == "cg1" else R1["iterations"]
    method = "cg" if method == "cg1" else method
    cfg = {"darts": {}, "neumann": {"neumann_iterations": R1["iterations"], "neumann_alpha": R1["lr"]},
           "cg": {"cg_iterations": its}}[method]
    inner = Inner(
        name="inner",
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=R1["lr"], momentum=0.9, weight_decay=5e-4),
        train_data_loader=shuffled_batches(train[0], train[1], R1["batch"], 1),
        config=Config(type=method, unroll_steps=R1["inner"], **cfg),
    )
    outer = Outer(
        name="outer",
        module=wnet,
        optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3, weight_decay=1e-4),
        train_data_loader=shuffled_batches(meta[0], meta[1], R1["batch"], 2),
        config=Config(),
    )
    iters = R1["inner"] if capture else outer_steps * R1["inner"]
    engine = Engine(
        problems=[outer, inner],
        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        config=EngineConfig(train_iters=iters, valid_step=10**9),
    )
    engine.run()
    return net, (captured[0] if captured else None)


def nth_batch(x, y, seed, n):
    from reweight_digits import shuffled_batches

    stream = shuffled_batches(x, y, R1["batch"], seed)
    for _ in range(n - 1):
        next(stream)
    return next(stream)


def reference_hypergradient(method, net, data):
    """Textbook version of the method at the state where the first hypergradient is taken.

    State: the classifier after the first ``R1["inner"]`` steps (``net``), the weight net at init, the last
    inner batch and the first meta batch. darts: Betty's unscaled form, exact -d2L_in/dlambda dw . v (the
    finite difference's limit, through the detach like any finite difference in w); neumann: the Neumann
    series; cg: textbook conjugate gradient; both ``R1["iterations"]`` long, on H = d2L_in/dw2.
    """
    its = 1 if method == "cg1" else R1["iterations"]
    train, meta = data[0], data[1]
    _, wnet = mwn_modules()
    batch = nth_batch(train[0], train[1], 1, R1["inner"])
    xm, ym = nth_batch(meta[0], meta[1], 2, 1)
    params, lam = list(net.parameters()), list(wnet.parameters())
    v = torch.autograd.grad(F.cross_entropy(net(xm), ym), params)
    if method == "darts":
        x, y = batch
        losses = F.cross_entropy(net(x), y, reduction="none").unsqueeze(1)
        loss = (wnet(losses) * losses).mean()  # no detach: the finite difference in w moves the weight net's input
        g = torch.autograd.grad(loss, params, create_graph=True)
        mixed = torch.autograd.grad(g, lam, grad_outputs=v)
        return -torch.cat([m.flatten() for m in mixed])
    g = torch.autograd.grad(inner_loss(net, wnet, batch), params, create_graph=True)

    def hvp(u):
        return torch.autograd.grad(g, params, grad_outputs=u, retain_graph=True)

    dot = lambda a, b: sum((p * q).sum() for p, q in zip(a, b, strict=False))  # noqa: E731
    if method == "neumann":
        term, total = list(v), list(v)
        for _ in range(R1["iterations"]):
            term = [t - R1["lr"] * h for t, h in zip(term, hvp(term), strict=False)]
            total = [a + b for a, b in zip(total, term, strict=False)]
        sol = [R1["lr"] * t for t in total]
    else:
        sol = [torch.zeros_like(t) for t in v]
        r, p = list(v), list(v)
        for _ in range(its):
            hp = hvp(p)
            alpha = dot(r, r) / dot(p, hp)
            sol = [a + alpha * b for a, b in zip(sol, p, strict=False)]
            r_new = [a - alpha * b for a, b in zip(r, hp, strict=False)]
            beta = dot(r_new, r_new) / dot(r, r)
            p = [a + beta * b for a, b in zip(r_new, p, strict=False)]
            r = r_new
    mixed = torch.autograd.grad(g, lam, grad_outputs=sol)
    return -torch.cat([m.flatten() for m in mixed])


def test_accuracy(net, test):
    with torch.no_grad():
        return float((net(test[0]).argmax(1) == test[1]).float().mean())


def row1(repeats):
    data = mwn_data()
    methods = ["darts", "neumann", "cg", "cg1"]
    impls = {"betty_like": run_ours_mwn, "betty-ml": run_betty_mwn}
    res = {(m, i): {"t": [], "acc": None} for m in methods for i in impls}
    grads = {}
    for m in methods:
        for i, fn in impls.items():
            net, grads[(m, i)] = fn(m, data, 1, capture=True)
            if i == "betty_like":
                grads[(m, "ref")] = reference_hypergradient(m, net, data)
    for _ in range(repeats):
        for m in methods:
            for i, fn in impls.items():
                start = time.perf_counter()
                net, _ = fn(m, data, R1["outer"], capture=False)
                res[(m, i)]["t"].append((time.perf_counter() - start) / R1["outer"] * 1e3)
                res[(m, i)]["acc"] = test_accuracy(net, data[2])
                print(f"  row1 {m} {i}: {res[(m, i)]['t'][-1]:.2f} ms/outer step, acc {res[(m, i)]['acc']:.3f}", flush=True)
    for m in methods:
        for i in impls:
            res[(m, i)]["mem"] = child_memory(["row1", m, i])
        a, b = grads[(m, "betty_like")], grads[(m, "betty-ml")]
        res[(m, "diff")] = float((a - b).norm() / b.norm())
        ref = grads[(m, "ref")]
        res[(m, "err")] = tuple(float((g - ref).norm() / ref.norm()) for g in (a, b))
    return res


def row1_child(method, impl):
    data = mwn_data()
    import betty.engine  # noqa: F401  (both frameworks imported before the baseline, whichever runs)

    import betty_like  # noqa: F401

    base = maxrss_mb()
    (run_ours_mwn if impl == "betty_like" else run_betty_mwn)(method, data, 20, capture=False)
    return maxrss_mb() - base


# =========================================================================== row 2: unrolled meta-gradient
R2 = {"batch": 2048, "lr": 0.1, "width": 128}


def r2_net():
    w = R2["width"]
    return nn.Sequential(nn.Linear(64, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 10)).double()


def r2_setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(R2["batch"], 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (R2["batch"],), generator=g)
    xv = torch.randn(R2["batch"], 64, generator=g, dtype=torch.float64)
    yv = torch.randint(0, 10, (R2["batch"],), generator=g)
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in r2_net().state_dict().items()}
    logits = torch.zeros(R2["batch"], dtype=torch.float64)  # meta-parameters: one weight logit per example
    return (x, y), (xv, yv), init, logits


def weighted(out, y, logits):
    return (torch.sigmoid(logits) * F.cross_entropy(out, y, reduction="none")).mean()


def fresh_net(init):
    net = r2_net()
    net.load_state_dict(init)
    return net


def unroll_ours(K, setup, memory="graph"):
    from betty_like import Engine, EngineConfig, Problem, ProblemConfig
    from betty_like.testing.closed_form import Scalar

    train, valid, init, logits = setup
    net = fresh_net(init)
    meta = Scalar(logits)

    class Inner(Problem):
        def training_step(self, batch):
            return weighted(self.module(batch[0]), batch[1], self.outer())

    class Outer(Problem):
        def training_step(self, batch):
            return F.cross_entropy(self.inner(batch[0]), batch[1])

    inner = Inner("inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=R2["lr"]), data=[train],
                  config=ProblemConfig(hypergrad="unroll", unroll_steps=K, unroll_memory=memory))
    outer = Outer("outer", module=meta, optimizer=torch.optim.SGD(meta.parameters(), lr=0.0), data=[valid])
    engine = Engine([outer, inner], dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
                    config=EngineConfig(train_iters=K, log_every=10**9))
    engine.run()
    return engine.status("outer").gradient["outer.value"]


def unroll_torchopt(K, setup):
    import torchopt

    train, valid, init, logits = setup
    net = fresh_net(init)
    lam = logits.clone().requires_grad_(True)
    opt = torchopt.MetaSGD(net, lr=R2["lr"])
    for _ in range(K):
        opt.step(weighted(net(train[0]), train[1], lam))
    return torch.autograd.grad(F.cross_entropy(net(valid[0]), valid[1]), lam)[0]


def unroll_higher(K, setup):
    import higher

    train, valid, init, logits = setup
    net = fresh_net(init)
    lam = logits.clone().requires_grad_(True)
    with higher.innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=R2["lr"]), copy_initial_weights=True) as (f, d):
        for _ in range(K):
            d.step(weighted(f(train[0]), train[1], lam))
        return torch.autograd.grad(F.cross_entropy(f(valid[0]), valid[1]), lam)[0]


UNROLLERS = {
    "betty_like (graph)": unroll_ours,
    "betty_like (remat)": functools.partial(unroll_ours, memory="remat"),
    "betty_like (mixed)": functools.partial(unroll_ours, memory="mixed"),
    "torchopt MetaSGD": unroll_torchopt,
    "higher innerloop_ctx": unroll_higher,
}


def row2(Ks, repeats):
    setup = r2_setup()
    res = {}
    for K in Ks:
        grads, times = {}, {name: [] for name in UNROLLERS}
        for name, fn in UNROLLERS.items():  # also a warm-up; the only timed run from K = 100 on (2-core budget)
            start = time.perf_counter()
            grads[name] = fn(K, setup)
            if K >= 100:
                times[name].append(time.perf_counter() - start)
        ref = grads["betty_like (graph)"]
        for _ in range(repeats if K < 100 else 0):
            for name, fn in UNROLLERS.items():
                start = time.perf_counter()
                fn(K, setup)
                times[name].append(time.perf_counter() - start)
        for name in UNROLLERS:
            res[(K, name)] = {"t": times[name], "diff": float((grads[name] - ref).norm() / ref.norm()),
                              "mem": child_memory(["row2", str(K), name])}
            print(f"  row2 K={K} {name}: {med(times[name]):.3f} s, {res[(K, name)]['mem']:.0f} MB, "
                  f"diff {res[(K, name)]['diff']:.1e}", flush=True)
        res[(K, "scale")] = float(ref.abs().max())
    return res


def row2_child(K, name):
    setup = r2_setup()
    import higher  # noqa: F401,E401  (imports outside the measured peak)

    import betty_like  # noqa: F401

    base = maxrss_mb()
    UNROLLERS[name](K, setup)
    return maxrss_mb() - base


# =========================================================================== row 3: implicit at a solution
def row3(repeats, iterations=10):
    import torchopt
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
        s = time.perf_counter(); ours_fn(); t_ours.append(time.perf_counter() - s)  # noqa: E702
        s = time.perf_counter(); theirs(); t_theirs.append(time.perf_counter() - s)  # noqa: E702
    err = lambda g: float((g - exact).abs() / exact.abs())  # noqa: E731
    _ = torchopt
    return {"ours": {"t": t_ours, "err": err(ours)}, "torchopt": {"t": t_theirs, "err": err(tg)},
            "iterations": iterations}


def plot_memory(Ks, memory):
    """Peak memory against K, one line per implementation (row 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in memory.items():
        ax.plot(Ks, values, marker="o", label=name)
    ax.set_xlabel("unrolled steps K")
    ax.set_ylabel("peak memory increase (MB, VmHWM)")
    ax.set_title("Meta-gradient through K SGD steps (float64)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(MEMORY_PLOT, dpi=120)


# =========================================================================== memory children
def child_memory(args) -> float:
    return float(child_output(__file__, args))


def main(argv=None):
    global QUICK
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs="+")
    parser.add_argument("--rows", default="1,2,3")
    parser.add_argument("--ks", default=None, help="row 2's K values, e.g. 10,50,100 (default 10,50,100,200)")
    parser.add_argument("--repeats", type=int, default=None, help="row 2's timed repeats for K < 100 (default 3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        kind, *rest = args.child
        if kind == "row1":
            print(row1_child(*rest))
        else:
            print(row2_child(int(rest[0]), rest[1]))
        return
    QUICK = args.quick
    if QUICK:
        R1["outer"] = 20
    rows = set(args.rows.split(","))
    t0 = time.perf_counter()
    import betty
    import higher
    import torchopt

    betty_version = (Path(betty.__file__).parent / "version.txt").read_text().strip()
    lines = [
        "# betty_like vs peers",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, one thread (`torch.set_num_threads(1)`). "
        f"Peers: betty-ml {betty_version}, torchopt {torchopt.__version__}, higher {getattr(higher, '__version__', '0.2.1')}.",
        f"Load average at start: {os.getloadavg()[0]:.1f} (a shared machine: absolute times are noisy, the paired ratios less so). "
        f"{'`--quick` run. ' if QUICK else ''}Times: median [min-max] over repeats, variants interleaved in one process. "
        "Ratio: betty_like / peer, paired per repeat (median [min-max]); below 1 = betty_like faster or smaller.",
        "Peak memory: increase of the peak resident set size (`VmHWM` of /proc/self/status; `ru_maxrss` survives exec "
        "and would report the parent's size) during the run, in a fresh subprocess per configuration (baseline after "
        "imports, data and model setup); whole-process memory, resolution about 1 MB.",
        "",
    ]
    plot = {}
    if "1" in rows:
        reps = 1 if QUICK else 3
        r = row1(reps)
        lines += [
            f"## 1. Meta-Weight-Net on digits (MLP 64-32-10, weight net 1-100-1), {R1['outer']} outer x {R1['inner']} inner steps",
            "",
            "Betty's example setting (inner SGD 0.1, momentum 0.9, wd 5e-4; outer Adam 1e-3; 40% uniform label noise; "
            f"batch {R1['batch']}), both frameworks on the same init and batch streams. neumann: {R1['iterations']} "
            f"iterations, alpha = 0.1 (= lr); cg: {R1['iterations']} iterations (betty_like `tol=1e-30` so it runs them all, as Betty does); "
            "darts: Betty's unscaled form (`darts_scale=\"identity\"`, epsilon 0.01/||v||). Peak memory over 20 outer steps "
            "(the graphs of this small model are tiny: the peak is mostly one-off runtime state, the same for every method). "
            "`first hypergrad rel. diff`: ||g_ours - g_betty|| / ||g_betty|| of the first outer gradient (same state and batch). "
            "Reference: the same method written out with exact autograd products at that state (darts: the exact mixed "
            "derivative the finite difference approximates; neumann: the Neumann series; cg: textbook CG), float32. "
            f"Time: {reps} repeat(s). "
            "cg with several iterations: H of this non-convex inner loss (away from a solution) is indefinite; "
            "betty_like's cg stops at the first non-positive curvature (and warns), textbook CG runs on and blows up "
            "(so its 'reference' is no reference there), and Betty's loop builds the next direction from the *old* "
            "residual (`p_new = r + beta * p` in `betty/hypergradient/cg.py`), which is not CG beyond one iteration. "
            "With one iteration (Betty's default) all three agree.",
            "",
            "| method | betty_like ms/outer step | betty-ml ms/outer step | time ratio | betty_like peak MB | betty-ml peak MB | "
            "test acc ours / betty | first hypergrad rel. diff | rel. error vs reference ours / betty |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in ["darts", "neumann", "cg", "cg1"]:
            a, b = r[(m, "betty_like")], r[(m, "betty-ml")]
            lines.append(
                f"| {LABEL.get(m, m)} | {spread(a['t'])} | {spread(b['t'])} | {ratio(a['t'], b['t'])} | {a['mem']:.0f} | {b['mem']:.0f} | "
                f"{a['acc']:.3f} / {b['acc']:.3f} | {r[(m, 'diff')]:.1e} | {r[(m, 'err')][0]:.1e} / {r[(m, 'err')][1]:.1e} |"
            )
            plot[f"MWN {m}"] = med([x / y for x, y in zip(a["t"], b["t"], strict=False)])
        lines.append("")
        print("\n".join(lines[-6:]), flush=True)
    if "2" in rows:
        Ks = [int(k) for k in args.ks.split(",")] if args.ks else [10, 50] if QUICK else [10, 50, 100, 200]
        reps = args.repeats or (2 if QUICK else 3)
        r = row2(Ks, reps)
        memory_plot = {name: [r[(K, name)]["mem"] for K in Ks] for name in UNROLLERS}
        width, batch = R2["width"], R2["batch"]
        lines += [
            f"## 2. Meta-gradient through K unrolled SGD steps (MLP 64-{width}-{width}-10, tanh, batch {batch}, float64)",
            "",
            f"Inner loss: mean of sigmoid(logit_i) * CE_i on a fixed batch; meta-parameters: the {batch} logits; outer loss: "
            "CE on a validation batch after K steps of SGD (lr 0.1). An activation-heavy setting: each step's graph holds "
            f"several {batch}x{width} activations, far more than the {64 * width + width * width + 10 * width + 2 * width + 10} "
            "weights. betty_like: `hypergrad=\"unroll\"`, `unroll_steps=K` (engine overhead included) with "
            "`unroll_memory=\"graph\"` (the whole graph kept), `\"remat\"` (each step's inputs kept, the step recomputed "
            "in the backward pass and differentiated by double backward) or `\"mixed\"` (recomputed, second-order "
            "products by forward-over-reverse); torchopt: `MetaSGD`; higher: `innerloop_ctx`. `rel. diff`: "
            "||g - g_graph|| / ||g_graph|| against betty_like's graph-mode meta-gradient. Times: median over "
            f"{reps} interleaved repeats for K < 100; from K = 100 on a single run each (the first, so it includes one-off "
            "costs), to fit the shared 2-core machine.",
            "",
            "| K | implementation | time s | time ratio vs torchopt | peak MB | torchopt peak / this peak | rel. diff vs graph |",
            "|---|---|---|---|---|---|---|",
        ]
        for K in Ks:
            peer = r[(K, "torchopt MetaSGD")]
            for name in UNROLLERS:
                x = r[(K, name)]
                rt = "-" if x is peer else ratio(x["t"], peer["t"])
                rm = f"{peer['mem'] / max(x['mem'], 1e-9):.1f}"
                lines.append(f"| {K} | {name} | {spread(x['t'])} | {rt} | {x['mem']:.0f} | {rm} | {x['diff']:.1e} |")
                if name.startswith("betty_like"):
                    plot[f"K={K} {name.split()[1]} vs torchopt"] = med([p / q for p, q in zip(x["t"], peer["t"], strict=False)])
        lo, hi = Ks[0], Ks[-1]
        slopes = {n: (r[(hi, n)]["mem"] - r[(lo, n)]["mem"]) / (hi - lo) for n in UNROLLERS}
        goal_k = 100 if 100 in Ks else hi
        best_peer = min(r[(goal_k, n)]["mem"] for n in UNROLLERS if not n.startswith("betty_like"))
        worst_lean = max(r[(goal_k, n)]["diff"] for n in ("betty_like (remat)", "betty_like (mixed)"))
        gains = {n: best_peer / max(r[(goal_k, n)]["mem"], 1e-9) for n in ("betty_like (remat)", "betty_like (mixed)")}
        lines += ["", f"Memory per extra unrolled step (peak MB between K={lo} and K={hi}, divided by {hi - lo}): "
                  + ", ".join(f"{n} {v:.2f} MB" for n, v in slopes.items())
                  + "; the rest of the difference is a fixed cost of the first run (engine set-up, allocator).",
                  "",
                  f"Goal (remat: >= 10x less peak memory than the peers' unroll at K = 100, same hypergradient to 1e-10): "
                  f"at K = {goal_k} the smaller peer peak is {best_peer:.0f} MB; remat {gains['betty_like (remat)']:.1f}x less, "
                  f"mixed {gains['betty_like (mixed)']:.1f}x less; largest rel. diff of remat/mixed vs graph {worst_lean:.1e}. "
                  + ("Met." if gains["betty_like (remat)"] >= 10 and worst_lean < 1e-10 else "Not met (see the numbers)."),
                  ""]
        plot_memory(Ks, memory_plot)
        print("\n".join(lines[-3 * len(Ks) - 5:]), flush=True)
    if "3" in rows:
        r = row3(10 if QUICK else 50)
        lines += [
            "## 3. Implicit hypergradient at the solution: closed-form ridge (d = 5, learn log lambda)",
            "",
            f"Both solve H v = grad with at most {r['iterations']} CG iterations, each with its default tolerance. betty_like: `hypergradient(program)` "
            "on `betty_like.testing.ridge('cg')` (inner at its exact solution); torchopt: `custom_root(optimality, "
            "solve=solve_cg)` around an exact inner solve. Time per hypergradient (torchopt's includes its inner "
            "solve, a 5x5 `linalg.solve`).",
            "",
            "| implementation | ms / hypergradient | ratio ours/torchopt | rel. error vs exact |",
            "|---|---|---|---|",
            f"| betty_like cg | {spread([1e3 * t for t in r['ours']['t']])} | {ratio(r['ours']['t'], r['torchopt']['t'])} | {r['ours']['err']:.1e} |",
            f"| torchopt custom_root + solve_cg | {spread([1e3 * t for t in r['torchopt']['t']])} | - | {r['torchopt']['err']:.1e} |",
            "",
        ]
        plot["ridge cg vs torchopt"] = med([p / q for p, q in zip(r["ours"]["t"], r["torchopt"]["t"], strict=False)])
        print("\n".join(lines[-5:]), flush=True)
    total = time.perf_counter() - t0
    lines.append(f"Total run time: {total:.0f} s.")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.4 * len(plot) + 1.5))
    names = list(plot)
    ax.barh(names, [plot[n] for n in names], color=["tab:green" if plot[n] < 1 else "tab:red" for n in names])
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlim(0, max(1.5, 1.05 * max(plot.values())))
    ax.set_xlabel("time ratio betty_like / peer (median; < 1 = betty_like faster)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    print(f"wrote {RESULTS} and {PLOT} in {total:.0f} s")


if __name__ == "__main__":
    main()
