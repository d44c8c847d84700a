"""KFAC-preconditioned CG against plain CG on the digits MLP and a small digits CNN at trained solutions.

The lower problem is a 64-32-10 tanh MLP, or a small CNN (conv 3x3 with 8 channels, tanh, linear
288-10, on the 8x8 images), trained (L-BFGS, float64) on 1000 sklearn digits with
per-example weights ``exp(lam)`` (the upper parameters, at 0); the upper loss is the cross-entropy on
300 held-out digits. At that solution, for ``cg`` with ``k`` iterations, ``kfac`` (KFAC-preconditioned
CG) with ``k`` iterations and pure KFAC (``iterations=0``), it measures the cosine and relative error
to the exact hypergradient (``torch.linalg.solve`` with the full float64 Hessian), the Hessian-vector
products the solve used (``SolveInfo.products``, KFAC's factor work excluded: it costs no HVP) and
the time of the whole upper step (median of repeats, methods interleaved).

Goal (issue 19): kfac reaches cg's accuracy with at least 3x fewer HVPs. For each cg row, the
fewest-product kfac row at least as accurate is found and the ratio of products reported.

Writes ``benchmarks/results/kfac_accuracy.md`` and ``kfac_accuracy.png``. One CPU thread.
"""

from __future__ import annotations

import math
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

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DT = torch.float64
DAMPING = 1e-3
CG_ITERATIONS = (5, 10, 20, 40, 80, 160)
KFAC_ITERATIONS = (0, 2, 5, 10, 20, 40, 80, 160)
GN_ITERATIONS = (10, 40)
REWEIGHT_STEPS = 300
REPEATS = 3
RESULTS = Path(__file__).parent / "results" / "kfac_accuracy.md"
PLOT = RESULTS.with_suffix(".png")


class Parameter(nn.Module):
    """A bare parameter vector as a module (the per-example log-weights)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(size, dtype=DT))

    def forward(self) -> torch.Tensor:
        return self.value


class Classifier(Problem):
    """Lower: weighted cross-entropy, written once as (outputs, loss of outputs)."""

    def output_loss(self, batch):
        x, y = batch
        weights = torch.exp(self.weights())
        return self.module(x), lambda z: (weights * F.cross_entropy(z, y, reduction="none")).mean()

    def training_step(self, batch):
        outputs, loss_fn = self.output_loss(batch)
        return loss_fn(outputs)


class Validation(Problem):
    """Upper: the classifier's loss on held-out digits."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)


def data():
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=DT), torch.tensor(y)
    return (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(DT)


def cnn() -> nn.Module:
    """A small CNN on the 8x8 digit images: KFAC factors its Conv2d and its Linear layer."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)
    ).to(DT)


MODELS = {"MLP 64-32-10 (tanh)": mlp, "CNN conv3x3x8-tanh-linear 288-10": cnn}


def trained(model: nn.Module, train) -> nn.Module:
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(train[0]), train[1]) + 0.5 * DAMPING * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def exact(model: nn.Module, train, valid) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact hypergradient ``-M^T (H + damping I)^-1 v`` and the spectrum of ``H + damping I``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(v):
        return dict(zip(names, (t.reshape(s) for t, s in zip(torch.split(v, [s.numel() for s in shapes]), shapes, strict=True)), strict=True))

    def lower(v, lam):
        z = torch.func.functional_call(model, unflat(v), (train[0],))
        return (torch.exp(lam) * F.cross_entropy(z, train[1], reduction="none")).mean()

    lam0 = torch.zeros(len(train[1]), dtype=DT)
    hessian = torch.autograd.functional.hessian(lambda v: lower(v, lam0), w0) + DAMPING * torch.eye(len(w0), dtype=DT)
    mixed = torch.autograd.functional.jacobian(
        lambda lam: torch.autograd.grad(lower(w0.requires_grad_(True), lam), w0, create_graph=True)[0], lam0
    )
    v = torch.func.grad(lambda w: F.cross_entropy(torch.func.functional_call(model, unflat(w), (valid[0],)), valid[1]))(w0)
    return -mixed.T @ torch.linalg.solve(hessian, v), torch.linalg.eigvalsh(hessian)


def run_once(model: nn.Module, train, valid, config: dict) -> tuple[torch.Tensor, int, float]:
    weights = Parameter(len(train[1]))
    lower = Classifier(
        "classifier", module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data=[train],
        config=ProblemConfig(damping=DAMPING, tol=1e-14, on_solver_failure="ignore", **config),
    )
    upper = Validation("weights", module=weights, optimizer=torch.optim.SGD(weights.parameters(), lr=0.0), data=[valid])
    engine = Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, EngineConfig(train_iters=1))
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start
    status = engine.status("weights")
    return status.gradient["weights.value"].detach(), status.diagnostics["classifier"].solve.products, seconds


def measure(model: nn.Module, train, valid, gauss_newton: bool) -> tuple[dict, dict, torch.Tensor]:
    """Every configuration on ``model`` at its trained solution: accuracy rows, times, and the spectrum."""
    reference, spectrum = exact(model, train, valid)
    configs = [("cg", k) for k in CG_ITERATIONS] + [("kfac", k) for k in KFAC_ITERATIONS]
    if gauss_newton:
        configs += [(f"{m} gauss_newton", k) for m in ("cg", "kfac") for k in GN_ITERATIONS]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    rows = {}
    for _ in range(REPEATS):  # interleaved: each repeat runs every configuration once
        for name, k in configs:
            method, *curvature = name.split()
            config = {"hypergrad": method, "iterations": k, "curvature": curvature[0] if curvature else "hessian"}
            grad, products, seconds = run_once(model, train, valid, config)
            times[(name, k)].append(seconds)
            cosine = float(F.cosine_similarity(grad, reference, dim=0))
            error = float((grad - reference).norm() / reference.norm())
            rows[(name, k)] = (cosine, error, products)
    return rows, times, spectrum


def main() -> None:
    torch.set_num_threads(1)
    train, valid = data()
    measured = {}
    for label, build in MODELS.items():
        model = trained(build(), train)
        measured[label] = (sum(p.numel() for p in model.parameters()), *measure(model, train, valid, build is mlp))
    write(measured, reweighting())


def kfac_products_for(rows, error: float) -> float | None:
    """HVPs kfac-PCG needs to reach ``error``: interpolated log-log between its measured rows (None: never reached)."""
    points = sorted((p, e) for (m, k), (_, e, p) in rows.items() if m == "kfac" and k > 0)
    if points[0][1] <= error:
        return float(points[0][0])
    for (p0, e0), (p1, e1) in zip(points, points[1:], strict=False):
        if e1 <= error < e0:
            t = math.log(e0 / error) / math.log(e0 / e1)
            return math.exp(math.log(p0) + t * math.log(p1 / p0))
    return None


def model_section(rows, times, spectrum) -> str:
    """One model's table of methods and its HVP-ratio table against the goal."""
    lines = [
        f"Eigenvalues of H + damping I: min {float(spectrum[0]):.3g}, max {float(spectrum[-1]):.3g}, condition number "
        f"{float(spectrum[-1] / spectrum[0]):.3g}.",
        "",
        "| method | iterations | HVPs | cosine | rel. error | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for (method, k), (cosine, error, products) in rows.items():
        t = times[(method, k)]
        name = {"kfac": "pure kfac" if k == 0 else "kfac-PCG"}.get(method, method)
        lines.append(
            f"| {name} | {k} | {products} | {cosine:.6f} | {error:.3g} | "
            f"{statistics.median(t):.3f} ({min(t):.3f}-{max(t):.3f}) |"
        )
    lines += ["", "Goal: kfac reaches cg's accuracy with >= 3x fewer HVPs.", ""]
    lines += [
        "For each cg row, the HVPs kfac-PCG needs for the same relative error, interpolated log-log between "
        "its measured rows (pure KFAC left out: it has no HVP to count).",
        "",
        "| cg iterations | cg HVPs | cg rel. error | kfac-PCG HVPs for that error | ratio cg / kfac |",
        "|---|---|---|---|---|",
    ]
    ratios = []
    for (method, k), (_, error, products) in rows.items():
        if method != "cg":
            continue
        needed = kfac_products_for(rows, error)
        if needed is None:
            lines.append(f"| {k} | {products} | {error:.3g} | not reached | - |")
            continue
        ratios.append(products / needed)
        lines.append(f"| {k} | {products} | {error:.3g} | {needed:.1f} | {products / needed:.1f}x |")
    met = bool(ratios) and min(ratios) >= 3.0
    lines += ["", f"Goal {'met' if met else 'NOT met'}: HVP ratios cg / kfac {min(ratios, default=0):.1f}x-{max(ratios, default=0):.1f}x."]
    return "\n".join(lines)


MLP_NOTE = (
    "Where it falls short, and what was tried (same problem, measured while building this): KFAC is "
    "block-diagonal over layers and approximates the Gauss-Newton part of the Hessian; this Hessian has a "
    "negative part of about -1e-3 (its smallest eigenvalue before damping), which no Gauss-Newton "
    "factorisation carries. Eigenvalue-corrected factors (EK-FAC) changed the 10-40 iteration errors by "
    "under 10 %; block damping (kfac_damping) from 1e-3 to 1e-1 did not do better than the default. "
    "The Gauss-Newton rows solve a different (PSD) system: they converge to its answer, which is itself "
    "0.25 off the exact hypergradient here, so on this problem gauss_newton trades accuracy for "
    "robustness; kfac helps most in its first iterations (10 HVPs: error 0.26 vs cg's 0.66)."
)


def write(measured: dict[str, tuple], reweighted: dict[str, float]) -> None:
    lines = [
        "# KFAC-preconditioned CG vs CG: digits MLP and CNN at trained solutions",
        "",
        "Float64, 1000 training digits with per-example weights exp(lam), lam = 0; upper loss on 300 held-out digits. "
        f"Each model trained by L-BFGS with weight decay {DAMPING}; every solve uses damping {DAMPING} (the reference "
        "too). Reference: torch.linalg.solve with the full Hessian. Time: whole upper step, median of "
        f"{REPEATS} interleaved repeats (min-max), {platform.processor() or platform.machine()}, one torch thread, on a "
        f"shared 2-core CPU loaded by other jobs (os.cpu_count() = {os.cpu_count()}): times are indicative only.",
        "HVPs: Hessian-vector products of the solve (`SolveInfo.products`); KFAC's factors cost one forward plus "
        "10 backward passes of the output-Hessian roots and no HVP.",
    ]
    for label, (size, rows, times, spectrum) in measured.items():
        lines += ["", f"## {label}, {size} parameters", "", model_section(rows, times, spectrum)]
        if label.startswith("MLP"):
            lines += ["", MLP_NOTE]
    lines += [
        "",
        f"## Reweighting digits (examples/reweight_digits.py, 40 % flipped labels, {REWEIGHT_STEPS} steps, float32, default settings)",
        "",
        "| run | test accuracy | time (s) |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {acc:.3f} | {sec:.1f} |" for name, (acc, sec) in reweighted.items()]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    plot(measured)
    print("\n".join(lines))


def plot(measured: dict[str, tuple]) -> None:
    fig, axes = plt.subplots(1, len(measured), figsize=(6 * len(measured), 4))
    for ax, (label, (_, rows, _, _)) in zip(axes, measured.items(), strict=True):
        for method, name in (("cg", "cg"), ("kfac", "kfac-PCG (0 = pure KFAC)"), ("cg gauss_newton", "cg, Gauss-Newton")):
            points = sorted((p, e) for (m, _), (_, e, p) in rows.items() if m == method)
            if points:
                ax.plot([max(p, 0.5) for p, _ in points], [e for _, e in points], "o-", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Hessian-vector products")
        ax.set_ylabel("relative error to the exact hypergradient")
        ax.set_title(f"digits {label.split(' (')[0]}, trained, float64")
        ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def reweighting() -> dict[str, tuple[float, float]]:
    """Final test accuracy of plain training and of learned reweighting with default cg and kfac."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
    import reweight_digits as example

    class SplitClassifier(example.Classifier):
        """The example's classifier with its loss split for kfac (the weights read the per-example losses)."""

        def output_loss(self, batch):
            x, y = batch

            def loss_fn(z: torch.Tensor) -> torch.Tensor:
                losses = F.cross_entropy(z, y, reduction="none")
                weights = self.reweight(losses.detach().unsqueeze(1)).squeeze(1)
                return (weights * losses).sum() / (weights.sum() + 1e-8)

            return self.module(x), loss_fn

    train, valid, test = example.noisy_digits(0.4, 0)
    results = {}
    start = time.perf_counter()
    results["plain training"] = (example.accuracy(example.train_plain(train, REWEIGHT_STEPS, 0.1, 100, 0), *test), 0.0)
    results["plain training"] = (results["plain training"][0], time.perf_counter() - start)
    for method in ("cg", "kfac"):
        torch.manual_seed(0)
        model, weights = example.classifier(), example.weight_network()
        inner = SplitClassifier(
            "classifier", module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            data=example.shuffled_batches(train[0], train[1], 100, 0), config=ProblemConfig(hypergrad=method),
        )
        outer = example.Reweight(
            "reweight", module=weights, optimizer=torch.optim.Adam(weights.parameters(), lr=1e-3, weight_decay=1e-4),
            data=[valid],
        )
        engine = Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}, EngineConfig(train_iters=REWEIGHT_STEPS, seed=0))
        start = time.perf_counter()
        try:
            engine.run()
            results[f"reweighted, hypergrad={method!r}"] = (example.accuracy(model, *test), time.perf_counter() - start)
        except FloatingPointError as error:  # a failed solve raises by default: the row says so
            results[f"reweighted, hypergrad={method!r} (raised: {str(error)[:80]}...)"] = (float("nan"), time.perf_counter() - start)
    return results


if __name__ == "__main__":
    main()
