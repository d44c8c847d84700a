"""Meta-Weight-Net on digits, betty_like against betty-ml, on an MLP and a small CNN.

Betty's ``learning_to_reweight`` setting shrunk to CPU size (``examples/meta_weight_net.py``): the
classifier's per-example losses are weighted by a 1-100-1 weight net; the weight net learns from the
classifier's loss on a clean meta set. Both frameworks start from the same init and read the same
batch streams, so per method they compute the same hypergradient up to each framework's definition.

What it measures, per network (``mlp``: 64-32-10; ``cnn``: two 3x3 conv layers on the 8x8 images):

* against betty-ml, for darts, neumann, cg (5 and 1 iterations) and ``unroll`` (reverse mode through
  the ``unroll_steps`` inner steps; in Betty an ``IterativeProblem`` under an upper problem with
  ``Config(first_order=False)``): time per outer step (paired ratio), peak memory (child process),
  final test accuracy, and the relative error of the first hypergradient against a written-out exact
  reference of that method at the same state;
* accuracy per second of betty_like's cg, neumann, pure KFAC (``kfac``, ``iterations=0``) and
  KFAC-preconditioned CG (``kfac``) on the same 5-iteration budget;
* every betty_like method with its default settings (``ProblemConfig(hypergrad=m)``) against plain
  training of the same classifier (same optimizer, init, batches and steps, every weight 1).

Run as a script only as a memory child (``--child NET METHOD IMPL``); the section comes from
``benchmarks/vs_peers.py --rows reweighting``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # a memory child, run as a script: make ``peers`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peers.common import child_output, maxrss_mb, med, ratio, spread, use_peer_paths  # noqa: E402

use_peer_paths()
from meta_weight_net import WeightNet, meta_weight_digits  # noqa: E402
from reweight_digits import shuffled_batches  # noqa: E402

SETTING = {"outer": 100, "inner": 5, "iterations": 5, "lr": 0.1, "batch": 100, "memory_outer": 20}
PEER_METHODS = ("darts", "neumann", "cg", "cg1", "unroll")
IMPLICIT = ("neumann", "cg", "cg1")  # approximations of one exact implicit hypergradient
SOLVER_METHODS = ("cg", "neumann", "kfac0", "kfac")  # the accuracy-per-second table (betty_like only)
LABEL = {"cg": "cg (5 it.)", "cg1": "cg (1 it., Betty's default)", "kfac0": "kfac, iterations=0 (pure KFAC)",
         "kfac": "kfac (KFAC-PCG, 5 it.)", "neumann": "neumann (5 it.)"}


# --------------------------------------------------------------------------- data, models, losses
def digits():
    """Betty's MWN split on digits: 40% uniform label noise, 100 clean meta examples, 500 test examples."""
    return meta_weight_digits(1, 100, 500, None, "uniform", 0.4)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    """Two 3x3 conv layers on the 8x8 digit (the second with stride 2), then a linear classifier."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))


NETS = {"mlp": mlp, "cnn": cnn}


def modules(net: str, seed: int = 1):
    torch.manual_seed(seed)
    return NETS[net](), WeightNet(100, 1)


def inner_loss(logits, y, weight_net):
    losses = F.cross_entropy(logits, y, reduction="none").unsqueeze(1)
    return (weight_net(losses.detach()) * losses).mean()


def batches(split, seed):
    return shuffled_batches(split[0], split[1], SETTING["batch"], seed)


def nth_batch(split, seed, n):
    stream = batches(split, seed)
    for _ in range(n - 1):
        next(stream)
    return next(stream)


def inner_optimizer(net):
    return torch.optim.SGD(net.parameters(), lr=SETTING["lr"], momentum=0.9, weight_decay=5e-4)


def test_accuracy(net, test):
    with torch.no_grad():
        return float((net(test[0]).argmax(1) == test[1]).float().mean())


# --------------------------------------------------------------------------- betty_like
def ours_config(method: str) -> dict:
    """ProblemConfig keywords of ``method``: Betty's budget for the peer rows, nothing but the name for ``default:m``."""
    if method.startswith("default:"):
        return {"hypergrad": method.split(":")[1]}
    its, warn = SETTING["iterations"], {"on_solver_failure": "warn"}  # Betty uses whatever its solver returns
    return {
        "darts": {"hypergrad": "darts", "darts_scale": "identity"},
        # indefinite="fail": keep Betty's series even where it diverges (the default would continue with MINRES)
        "neumann": {"hypergrad": "neumann", "iterations": its, "alpha": SETTING["lr"], "tol": 1e-30,
                    "indefinite": "fail", **warn},
        "cg": {"hypergrad": "cg", "iterations": its, "tol": 1e-30, **warn},
        "cg1": {"hypergrad": "cg", "iterations": 1, "tol": 1e-30, **warn},
        "unroll": {"hypergrad": "unroll"},
        "kfac0": {"hypergrad": "kfac", "iterations": 0, **warn},
        "kfac": {"hypergrad": "kfac", "iterations": its, "tol": 1e-30, **warn},
    }[method]


def run_ours(net_name, method, data, outer_steps, capture=False):
    """Train with betty_like; the classifier and (``capture``: after the first outer step only) the first hypergradient."""
    from betty_like import Engine, EngineConfig, Problem, ProblemConfig

    train, meta = data[0], data[1]
    net, wnet = modules(net_name)

    class Inner(Problem):
        def training_step(self, batch):
            return inner_loss(self.module(batch[0]), batch[1], self.outer)

        def output_loss(self, batch):  # the split KFAC needs: logits, and the loss as a function of them
            return self.module(batch[0]), lambda z: inner_loss(z, batch[1], self.outer)

    class Outer(Problem):
        def training_step(self, batch):
            return F.cross_entropy(self.inner(batch[0]), batch[1])

    inner = Inner("inner", module=net, optimizer=inner_optimizer(net), data=batches(train, 1),
                  config=ProblemConfig(unroll_steps=SETTING["inner"], **ours_config(method)))
    outer = Outer("outer", module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3, weight_decay=1e-4),
                  data=batches(meta, 2))
    steps = 1 if capture else outer_steps
    engine = Engine([outer, inner], dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
                    config=EngineConfig(train_iters=steps * SETTING["inner"], log_every=10**9))
    engine.run()
    if not capture:
        return net, None
    grad = engine.status("outer").gradient
    return net, torch.cat([grad[f"outer.{n}"].flatten() for n, _ in wnet.named_parameters()])


# --------------------------------------------------------------------------- betty-ml
def betty_inner(method: str):
    """Betty's lower problem class for ``method``: an ImplicitProblem, or an IterativeProblem for ``unroll``.

    Betty 0.2.1's IterativeProblem fails in ``initialize``: ``Problem.initialize`` already calls the
    subclass's ``patch_optimizer``, after which ``initialize_optimizer_state`` walks the differentiable
    optimizer's param groups, which hold no params (``KeyError: 'params'``), and ``patch_optimizer``
    runs a second time on an already patched optimizer (an ``AssertionError``). The benchmark patches
    once and skips ``initialize_optimizer_state``, which only took a real optimizer step on zero
    gradients to create the optimizer state (a step that moves the weights under weight decay); the
    momentum buffers are then created by the first step, as in betty_like. ``optimizer_step`` reads
    an ``_fp16`` attribute that Betty never sets; the class sets it to False.
    An IterativeProblem keeps its weights as functional ``params`` whose graph runs through every update;
    Betty does not cut it between outer steps, so each inner loop starts by detaching them (and the
    momentum buffers), as its MAML example restarts its inner loop; without that the second outer step
    backpropagates into the freed graph of the first.
    """
    from betty.problems import ImplicitProblem, IterativeProblem

    if method != "unroll":
        class Inner(ImplicitProblem):
            def training_step(self, batch):
                return inner_loss(self.module(batch[0]), batch[1], self.outer)

        return Inner

    class Unrolled(IterativeProblem):
        _fp16 = False  # read by IterativeProblem.optimizer_step, set nowhere in Betty 0.2.1

        def forward(self, x):
            return self.fmodule(self.params, self.buffers, x)

        def patch_optimizer(self):
            """Patched once: ``initialize`` calls this twice, and Betty's patch asserts a torch optimizer."""
            if isinstance(self.optimizer, torch.optim.SGD):
                super().patch_optimizer()

        def initialize_optimizer_state(self):
            """Skipped: by now the optimizer is already Betty's differentiable one (see ``betty_inner``)."""

        def on_inner_loop_start(self):
            self.params = tuple(p.detach().requires_grad_() for p in self.params)
            for state in self.optimizer.state:  # Betty's differentiable optimizer: a list, one dict per parameter
                if state and state.get("momentum_buffer") is not None:
                    state["momentum_buffer"] = state["momentum_buffer"].detach()

        def training_step(self, batch):
            return inner_loss(self.forward(batch[0]), batch[1], self.outer)

    return Unrolled


def betty_config(method: str) -> dict:
    its = SETTING["iterations"]
    return {"darts": {"type": "darts"}, "neumann": {"type": "neumann", "neumann_iterations": its, "neumann_alpha": SETTING["lr"]},
            "cg": {"type": "cg", "cg_iterations": its}, "cg1": {"type": "cg", "cg_iterations": 1},
            "unroll": {"retain_graph": True}}[method]  # unroll: each step's forward graph is needed again by the upper backward


def run_betty(net_name, method, data, outer_steps, capture=False):
    """Train with betty-ml; the classifier (its final weights) and the first hypergradient when ``capture``."""
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    logging.disable(logging.INFO)  # Betty logs every engine start and finish
    train, meta = data[0], data[1]
    net, wnet = modules(net_name)
    captured = []

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            return F.cross_entropy(self.inner(batch[0]), batch[1])

        def grad_callback(self):
            if not captured:
                captured.append(torch.cat([p.grad.detach().flatten().clone() for p in self.module.parameters()]))

    inner = betty_inner(method)(
        name="inner", module=net, optimizer=inner_optimizer(net), train_data_loader=batches(train, 1),
        config=Config(unroll_steps=SETTING["inner"], **betty_config(method)))
    outer = Outer(name="outer", module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3, weight_decay=1e-4),
                  train_data_loader=batches(meta, 2), config=Config(first_order=method != "unroll"))
    steps = 1 if capture else outer_steps
    engine = Engine(problems=[outer, inner], dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
                    config=EngineConfig(train_iters=steps * SETTING["inner"], valid_step=10**9))
    engine.run()
    if method == "unroll":  # the trained weights live in the functional params, not in the module
        with torch.no_grad():
            for p, q in zip(net.parameters(), inner.params, strict=True):
                p.copy_(q)
    return net, (captured[0] if captured else None)


IMPLS = {"betty_like": run_ours, "betty-ml": run_betty}


# --------------------------------------------------------------------------- exact references
def reference(net_name, method, trained, data):
    """The method written out with exact autograd products, at the state of the first hypergradient.

    State: the classifier after the first ``inner`` steps (``trained``), the weight net at init, the
    last inner batch and the first meta batch. darts: Betty's unscaled form, the exact mixed
    derivative its finite difference approximates (through the detach, as any finite difference in w
    is); neumann: the Neumann series; cg: textbook conjugate gradient, both ``iterations`` long on
    H = d2L_in/dw2; unroll: reverse mode through the ``inner`` SGD steps (momentum, weight decay) from init.
    """
    if method == "unroll":
        return unrolled_reference(net_name, data)
    train, meta = data[0], data[1]
    _, wnet = modules(net_name)
    x, y = nth_batch(train, 1, SETTING["inner"])
    xm, ym = nth_batch(meta, 2, 1)
    params, lam = list(trained.parameters()), list(wnet.parameters())
    v = torch.autograd.grad(F.cross_entropy(trained(xm), ym), params)
    if method == "darts":
        losses = F.cross_entropy(trained(x), y, reduction="none").unsqueeze(1)
        g = torch.autograd.grad((wnet(losses) * losses).mean(), params, create_graph=True)
        return -flat(torch.autograd.grad(g, lam, grad_outputs=v))
    g = torch.autograd.grad(inner_loss(trained(x), y, wnet), params, create_graph=True)

    def hvp(u):
        return torch.autograd.grad(g, params, grad_outputs=u, retain_graph=True)

    sol = neumann_series(hvp, v) if method == "neumann" else textbook_cg(hvp, v, 1 if method == "cg1" else SETTING["iterations"])
    return -flat(torch.autograd.grad(g, lam, grad_outputs=sol))


def implicit_reference(net_name, trained, data):
    """The exact implicit hypergradient ``-d2L_in/dlambda dw H^+ v`` (dense H, float64) that neumann and cg approximate.

    ``H^+``: the pseudo-inverse, since dead ReLU units make H singular; it gives the minimum-norm solution,
    the one Krylov solvers started at zero converge to on a consistent system.
    At the same state as :func:`reference`; H is formed by reverse-over-reverse in chunks (a few
    thousand weights), so this is a check for small networks only.
    """
    train, meta = data[0], data[1]
    _, wnet = modules(net_name)
    x, y = nth_batch(train, 1, SETTING["inner"])
    xm, ym = nth_batch(meta, 2, 1)
    names = [n for n, _ in trained.named_parameters()]
    params = [p.detach() for p in trained.parameters()]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]

    def unflatten(wflat):
        return {n: c.view(s) for n, c, s in zip(names, wflat.split(sizes), shapes, strict=True)}

    def loss(wflat):
        return inner_loss(torch.func.functional_call(trained, unflatten(wflat), (x,)), y, wnet)

    w0 = flat(params)
    hessian = torch.func.jacrev(torch.func.grad(loss), chunk_size=256)(w0).detach().double()
    v = torch.func.grad(lambda w: F.cross_entropy(torch.func.functional_call(trained, unflatten(w), (xm,)), ym))(w0)
    sol = (torch.linalg.pinv(hessian, hermitian=True, rtol=1e-10) @ v.double()).float()  # dead ReLUs make H singular
    g = torch.autograd.grad(inner_loss(trained(x), y, wnet), list(trained.parameters()), create_graph=True)
    return -flat(torch.autograd.grad(g, list(wnet.parameters()), grad_outputs=[sol.view(s) for sol, s in
                                                                                   zip(sol.split(sizes), shapes, strict=True)]))


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def neumann_series(hvp, v):
    term, total = list(v), list(v)
    for _ in range(SETTING["iterations"]):
        term = [t - SETTING["lr"] * h for t, h in zip(term, hvp(term), strict=True)]
        total = [a + b for a, b in zip(total, term, strict=True)]
    return [SETTING["lr"] * t for t in total]


def textbook_cg(hvp, v, iterations):
    def dot(a, b):
        return sum((p * q).sum() for p, q in zip(a, b, strict=True))

    sol, r, p = [torch.zeros_like(t) for t in v], list(v), list(v)
    for _ in range(iterations):
        hp = hvp(p)
        alpha = dot(r, r) / dot(p, hp)
        sol = [a + alpha * b for a, b in zip(sol, p, strict=True)]
        r_new = [a - alpha * b for a, b in zip(r, hp, strict=True)]
        beta = dot(r_new, r_new) / dot(r, r)
        p, r = [a + beta * b for a, b in zip(r_new, p, strict=True)], r_new
    return sol


def unrolled_reference(net_name, data):
    """d L_meta(w_K) / d lambda through K = ``inner`` steps of SGD (lr, momentum 0.9, wd 5e-4) from init."""
    train, meta = data[0], data[1]
    net, wnet = modules(net_name)
    names = [n for n, _ in net.named_parameters()]
    w = [p.detach().clone().requires_grad_() for p in net.parameters()]
    buf = None
    for k in range(1, SETTING["inner"] + 1):
        x, y = nth_batch(train, 1, k)
        out = torch.func.functional_call(net, dict(zip(names, w, strict=True)), (x,))
        g = torch.autograd.grad(inner_loss(out, y, wnet), w, create_graph=True)
        d = [gi + 5e-4 * wi for gi, wi in zip(g, w, strict=True)]
        buf = d if buf is None else [0.9 * b + di for b, di in zip(buf, d, strict=True)]
        w = [wi - SETTING["lr"] * b for wi, b in zip(w, buf, strict=True)]
    xm, ym = nth_batch(meta, 2, 1)
    out = torch.func.functional_call(net, dict(zip(names, w, strict=True)), (xm,))
    return flat(torch.autograd.grad(F.cross_entropy(out, ym), list(wnet.parameters())))


# --------------------------------------------------------------------------- measurements
def plain_accuracy(net_name, data, steps):
    """The classifier trained without meta-learning: same init, optimizer, batches and steps, every weight 1."""
    net, _ = modules(net_name)
    opt, stream = inner_optimizer(net), batches(data[0], 1)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(stream)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return test_accuracy(net, data[2]), time.perf_counter() - start


def errors(net_name, data) -> dict:
    """Per peer method: rel. error of each framework's first hypergradient vs the reference, and between them."""
    out, exact = {}, None
    for m in PEER_METHODS:
        trained, ours = run_ours(net_name, m, data, 1, capture=True)
        ref = reference(net_name, m, trained, data)
        _, theirs = run_betty(net_name, m, data, 1, capture=True)
        pair = (("betty_like", ours), ("betty-ml", theirs))
        out[m] = {i: float((g - ref).norm() / ref.norm()) for i, g in pair}
        out[m]["diff"] = float((ours - theirs).norm() / theirs.norm())
        if m in IMPLICIT:  # every implicit method is taken at the same state: one dense solve serves them all
            exact = implicit_reference(net_name, trained, data) if exact is None else exact
            out[m]["exact"] = tuple(float((g - exact).norm() / exact.norm()) for _, g in pair)
    return out


def timings(net_name, data, repeats, outer) -> dict:
    """Interleaved timed runs: ms per outer step and final accuracy per (method, implementation)."""
    runs = [(m, i) for m in PEER_METHODS for i in IMPLS] + [(m, "betty_like") for m in SOLVER_METHODS if m not in PEER_METHODS]
    res = {k: {"t": [], "acc": None} for k in runs}
    for _ in range(repeats):
        for m, i in runs:
            start = time.perf_counter()
            net, _ = IMPLS[i](net_name, m, data, outer)
            res[(m, i)]["t"].append((time.perf_counter() - start) / outer * 1e3)
            res[(m, i)]["acc"] = test_accuracy(net, data[2])
            print(f"  reweighting {net_name} {m} {i}: {res[(m, i)]['t'][-1]:.1f} ms/outer step, acc {res[(m, i)]['acc']:.3f}", flush=True)
    return res


def defaults(net_name, data, outer) -> dict:
    """Final accuracy and seconds of every betty_like method at its default settings."""
    from betty_like.hypergrad import METHODS

    res = {}
    for m in METHODS:
        start = time.perf_counter()
        try:
            net, _ = run_ours(net_name, f"default:{m}", data, outer)
            res[m] = (test_accuracy(net, data[2]), time.perf_counter() - start, "")
        except Exception as error:  # a default that stops training is a result of this table, not a crash of it
            res[m] = (float("nan"), time.perf_counter() - start, f"{type(error).__name__}: {str(error)[:160]}")
        print(f"  reweighting {net_name} default {m}: acc {res[m][0]:.3f}, {res[m][1]:.1f} s {res[m][2]}", flush=True)
    return res


def child(net_name: str, method: str, impl: str) -> float:
    """Peak-memory increase (MB) of ``memory_outer`` outer steps in this fresh process."""
    data = digits()
    import betty.engine  # noqa: F401  (both frameworks imported before the baseline, whichever runs)

    import betty_like  # noqa: F401

    base = maxrss_mb()
    IMPLS[impl](net_name, method, data, SETTING["memory_outer"])
    return maxrss_mb() - base


def memory(net_name) -> dict:
    return {(m, i): float(child_output(__file__, [net_name, m, i])) for m in PEER_METHODS for i in IMPLS}


# --------------------------------------------------------------------------- the section
def peer_table(net_name, t, mem, err) -> list[str]:
    lines = ["| method | betty_like ms/outer step | betty-ml ms/outer step | time ratio | peak MB ours / betty | memory ratio | "
             "test acc ours / betty | rel. error vs reference ours / betty | rel. error vs exact implicit ours / betty | "
             "first hypergrad rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in PEER_METHODS:
        a, b = t[(m, "betty_like")], t[(m, "betty-ml")]
        ma, mb = mem[(m, "betty_like")], mem[(m, "betty-ml")]
        e = err[m]
        lines.append(f"| {LABEL.get(m, m)} | {spread(a['t'])} | {spread(b['t'])} | {ratio(a['t'], b['t'])} | {ma:.0f} / {mb:.0f} | "
                     f"{ma / max(mb, 1e-9):.2f} | {a['acc']:.3f} / {b['acc']:.3f} | {e['betty_like']:.1e} / {e['betty-ml']:.1e} | "
                     f"{'{:.2g} / {:.2g}'.format(*e['exact']) if 'exact' in e else '-'} | {e['diff']:.1e} |")
    return lines


def solver_table(t, plain) -> list[str]:
    lines = ["| method | ms/outer step | training s | final test acc | acc / s | (acc - plain acc) / s |", "|---|---|---|---|---|---|"]
    for m in SOLVER_METHODS:
        x = t[(m, "betty_like")]
        seconds = med(x["t"]) * SETTING["outer"] / 1e3
        lines.append(f"| {LABEL.get(m, m)} | {spread(x['t'])} | {seconds:.2f} | {x['acc']:.3f} | {x['acc'] / seconds:.3f} | "
                     f"{(x['acc'] - plain[0]) / seconds:+.4f} |")
    return lines


def default_table(d, plain) -> list[str]:
    lines = ["| method (defaults) | final test acc | plain acc | above plain | time s | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {acc:.3f} | {plain[0]:.3f} | {'yes' if acc > plain[0] else '**no**'} | {s:.1f} | {note} |"
              for m, (acc, s, note) in d.items()]
    return lines


def goals(per_net) -> list[str]:
    """The issue's goals for this row (time <= 0.67x, memory <= 0.8x of Betty at equal method; accuracy), stated.

    Accuracy: for neumann and cg against the exact implicit hypergradient they approximate (the
    textbook 'reference' of multi-iteration CG diverges on this indefinite H); for darts and unroll
    against the written-out method.
    """
    out = []
    for net_name, (t, mem, err, _, _) in per_net.items():
        for m in PEER_METHODS:
            r = med([a / b for a, b in zip(t[(m, "betty_like")]["t"], t[(m, "betty-ml")]["t"], strict=True)])
            mr = mem[(m, "betty_like")] / max(mem[(m, "betty-ml")], 1e-9)
            ours, theirs = err[m].get("exact", (err[m]["betty_like"], err[m]["betty-ml"]))
            accurate = ours <= theirs * 1.01 + 1e-6
            out.append(f"{net_name} {LABEL.get(m, m)}: time {r:.2f}x ({'met' if r <= 0.67 else 'missed'}), memory {mr:.2f}x "
                       f"({'met' if mr <= 0.8 else 'missed'}), hypergradient error {ours:.2g} vs Betty's {theirs:.2g} "
                       f"({'at least as accurate' if accurate else '**less accurate**'})")
    return out


def section(quick: bool, repeats: int | None = None, nets: str | None = None, defaults_nets: str | None = None, **_) -> str:
    """Markdown section: the peer tables, accuracy per second, defaults vs plain training, goals, per network."""
    load = os.getloadavg()[0]
    outer = 20 if quick else SETTING["outer"]
    reps = repeats or (1 if quick else 3)
    data = digits()
    per_net = {}
    for net_name in (nets or "mlp,cnn").split(","):
        err = errors(net_name, data)
        plain = plain_accuracy(net_name, data, outer * SETTING["inner"])
        t = timings(net_name, data, reps, outer)
        d = defaults(net_name, data, outer) if net_name in (defaults_nets or "mlp").split(",") else None
        per_net[net_name] = (t, memory(net_name), err, plain, d)
    lines = [
        "## Meta-Weight-Net on digits vs betty-ml: MLP and CNN",
        "",
        f"Load average at start: {load:.1f}. Betty's example setting: inner SGD 0.1, momentum 0.9, wd 5e-4; outer Adam 1e-3; "
        f"40% uniform label noise; batch {SETTING['batch']}; {outer} outer x {SETTING['inner']} inner steps; both frameworks on "
        "the same init and batch streams. Networks: `mlp` 64-32-10; `cnn` Conv(1->8, 3x3) ReLU Conv(8->16, 3x3, stride 2) "
        f"ReLU Linear(256->10) on the 8x8 images. neumann: {SETTING['iterations']} iterations, alpha = 0.1 (= lr); cg: "
        f"{SETTING['iterations']} or 1 iterations (betty_like `tol=1e-30` so it runs them all, as Betty does); darts: Betty's "
        "unscaled form (`darts_scale=\"identity\"`); unroll: reverse mode through the 5 inner steps (betty_like "
        "`hypergrad=\"unroll\"`; Betty: `IterativeProblem` under `Config(first_order=False)` with `retain_graph=True`, "
        "which in Betty 0.2.1 needs four work-arounds in the benchmark's subclass: patch the optimizer once (Betty patches "
        "it twice, then asserts), skip `initialize_optimizer_state` (it fails on the patched optimizer; it would take a "
        "real step on zero gradients), set the `_fp16` attribute Betty reads but never sets, and detach the functional "
        "params and momentum buffers at each inner-loop start (Betty keeps the graph across outer steps, so the second "
        "outer step backpropagates into a freed graph). Time: median of "
        f"{reps} interleaved repeat(s). Peak memory: {SETTING['memory_outer']} outer steps in a child process. "
        "`rel. error vs reference`: against the method written out with exact autograd products at the state of the first "
        "hypergradient (darts: the exact mixed derivative its finite difference approximates; neumann: the series; cg: "
        "textbook CG; unroll: reverse mode through the 5 momentum-SGD steps from init), float32. `rel. error vs exact "
        "implicit`: against -d2L/dlambda dw H^+ v with the dense Hessian (float64 pseudo-inverse: dead ReLUs make H "
        "singular), the quantity neumann and cg approximate; at this state (5 steps from init, far from a solution) "
        "H is indefinite and no 5-iteration method is close to it. cg with several iterations: betty_like's cg switches "
        "to MINRES at the first non-positive curvature (valid for a symmetric indefinite system; it warns), textbook CG "
        "runs on with a negative step and blows up (so 'reference' is no reference there), and Betty builds the next "
        "direction from the old residual (`betty/hypergradient/cg.py`), which is not CG beyond one iteration. The peer "
        "rows set `on_solver_failure=\"warn\"` on betty_like's implicit methods (Betty uses whatever its solver returns; "
        "neumann also sets `indefinite=\"fail\"`, so that a series that diverges, as on the CNN with alpha = 0.1, is "
        "used as it is, as Betty does, instead of being continued with MINRES as at betty_like's defaults).",
    ]
    for net_name, (t, mem, err, plain, d) in per_net.items():
        lines += ["", f"### {net_name}: against betty-ml", "", *peer_table(net_name, t, mem, err),
                  "", f"### {net_name}: accuracy per second (betty_like, {SETTING['iterations']}-iteration budget; "
                  f"plain training {plain[0]:.3f} in {plain[1]:.1f} s)", "", *solver_table(t, plain),
                  *default_section(net_name, d, plain, outer)]
    lines += ["", "### Goals (per outer step <= 0.67x Betty's time, <= 0.8x its peak memory, hypergradients at least as accurate)",
              "", *[f"- {g}" for g in goals(per_net)]]
    return "\n".join(lines)


def default_section(net_name, d, plain, outer) -> list[str]:
    """The defaults-vs-plain subsection, or why it was not run for this network."""
    head = ["", f"### {net_name}: every method at its defaults against plain training", ""]
    if d is None:
        return [*head, "Not run for this network (`--defaults-nets`): at the defaults the implicit methods run up to 100 "
                "solver iterations per outer step, several seconds per outer step on this CNN on the shared machine."]
    return [*head, f"`ProblemConfig(hypergrad=m, unroll_steps={SETTING['inner']})`, nothing else set (the implicit methods: up to 100 "
                  "iterations, default tolerance); one run each, seed 1; plain: the same classifier, optimizer, init, "
            f"batches and {outer * SETTING['inner']} steps, every weight 1. 500 test examples: one example is 0.002.", "",
            *default_table(d, plain)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="memory child of the reweighting row")
    parser.add_argument("--child", nargs=3, metavar=("NET", "METHOD", "IMPL"), required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(child(*args.child))
