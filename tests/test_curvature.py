"""Gauss-Newton curvature and KFAC, each against the matrices written out in plain torch (float64).

References: the generalised Gauss-Newton matrix from a full Jacobian (``torch.autograd.functional``)
and the output loss's Hessian; KFAC factors as per-example (and per-position) sums of outer
products; hypergradients from ``torch.linalg.solve`` with the full Hessian.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.hypergrad import HypergradContext, blocks_of, gauss_newton, kronecker_factors

DT = torch.float64


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in params.values()])


def unflat(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pieces = torch.split(vector, [t.numel() for t in like.values()])
    return {k: p.reshape(t.shape) for (k, t), p in zip(like.items(), pieces, strict=True)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# --------------------------------------------------------------------------- Gauss-Newton products
def mlp_outputs(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ params["w1"].T + params["b1"])
    return h @ params["w2"].T + params["b2"]


def test_gauss_newton_products_equal_a_brute_force_ggn():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 4, generator=g, dtype=DT), torch.randint(0, 3, (7,), generator=g)
    weights = torch.rand(7, generator=g, dtype=DT)
    params = {
        "w1": torch.randn(5, 4, generator=g, dtype=DT),
        "b1": torch.randn(5, generator=g, dtype=DT),
        "w2": torch.randn(3, 5, generator=g, dtype=DT),
        "b2": torch.randn(3, generator=g, dtype=DT),
    }

    def output_loss(z: torch.Tensor) -> torch.Tensor:
        return (weights * F.cross_entropy(z, y, reduction="none")).mean()

    w = {k: t.clone().requires_grad_(True) for k, t in params.items()}
    ctx = HypergradContext(
        "lower", lambda w, x_: output_loss(mlp_outputs(w, x)), w, {}, {}, ProblemConfig(hypergrad="cg", curvature="gauss_newton"),
        optimizer=None, outputs=lambda w, x_: (mlp_outputs(w, x), output_loss),
    )
    product = gauss_newton(ctx)
    # brute force: J (outputs x params) from the full Jacobian, H_out from the output loss's Hessian
    jac = jacobian(lambda v: mlp_outputs(unflat(v, params), x).reshape(-1), flat(params))
    z = mlp_outputs(params, x)
    h_out = hessian(lambda zz: output_loss(zz.reshape(z.shape)), z.reshape(-1))
    ggn = jac.T @ h_out @ jac
    assert torch.linalg.eigvalsh(ggn).min() > -1e-12  # PSD, unlike the Hessian of this tanh network
    full = hessian(lambda v: output_loss(mlp_outputs(unflat(v, params), x)), flat(params))
    assert torch.linalg.eigvalsh(full).min() < -1e-6
    for seed in range(3):
        u = torch.randn(flat(params).numel(), generator=torch.Generator().manual_seed(seed), dtype=DT)
        got = flat(product(unflat(u, params), False))
        assert rel(got, ggn @ u) < 1e-12


# --------------------------------------------------------------------------- bilevel problems in float64
class Parameter(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = nn.Parameter(value.clone())

    def forward(self) -> torch.Tensor:
        return self.value


class WeightedFit(Problem):
    """Lower: per-example weights ``softmax(lam)`` on the cross-entropy of its classifier."""

    def output_loss(self, batch):
        x, y = batch
        weights = torch.exp(self.upper())
        return self.module(x), lambda z: (weights * F.cross_entropy(z, y, reduction="none")).mean()

    def training_step(self, batch):
        outputs, loss_fn = self.output_loss(batch)
        return loss_fn(outputs)


class NoSplit(WeightedFit):
    output_loss = Problem.output_loss


class Validation(Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.lower(x), y)


def bilevel(model: nn.Module, train, valid, lower_cls=WeightedFit, **config) -> Engine:
    lam = Parameter(torch.zeros(len(train[1]), dtype=DT))
    lower = lower_cls(
        "lower", module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data=[train],
        config=ProblemConfig(**config),
    )
    upper = Validation("upper", module=lam, optimizer=torch.optim.SGD(lam.parameters(), lr=0.0), data=[valid])
    return Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, EngineConfig(train_iters=1))


def reference(model: nn.Module, train, valid, damping: float, gauss_newton: bool = False) -> torch.Tensor:
    """``-M^T (C + damping I)^-1 v`` with the full curvature ``C`` (Hessian or GGN), ``M = d grad_w f / d lam``."""
    params = {k: t.detach() for k, t in model.named_parameters()}
    x, y = train

    def outputs(v: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, unflat(v, params), (x,))

    def lower_loss(v: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        weights = torch.exp(lam)
        return (weights * F.cross_entropy(outputs(v), y, reduction="none")).mean()

    w0, lam0 = flat(params), torch.zeros(len(y), dtype=DT)
    if gauss_newton:
        jac = jacobian(lambda v: outputs(v).reshape(-1), w0)
        z = outputs(w0)
        h_out = hessian(
            lambda zz: (torch.exp(lam0) * F.cross_entropy(zz.reshape(z.shape), y, reduction="none")).mean(),
            z.reshape(-1),
        )
        curvature = jac.T @ h_out @ jac
    else:
        curvature = hessian(lambda v: lower_loss(v, lam0), w0)
    mixed = jacobian(lambda lam: torch.autograd.grad(lower_loss(w0.requires_grad_(True), lam), w0, create_graph=True)[0], lam0)
    v = torch.func.grad(lambda w: F.cross_entropy(torch.func.functional_call(model, unflat(w, params), (valid[0],)), valid[1]))(w0)
    eye = torch.eye(len(w0), dtype=DT)
    return -mixed.T @ torch.linalg.solve(curvature + damping * eye, v)


def digits_like(n: int, d: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def tanh_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


@pytest.mark.parametrize("method", ["cg", "neumann", "kfac"])
def test_gauss_newton_hypergradient_equals_the_ggn_solve(method):
    train, valid = digits_like(9, 4, 3, 1), digits_like(5, 4, 3, 2)
    model = tanh_mlp(0)
    expected = reference(model, train, valid, damping=0.1, gauss_newton=True)
    engine = bilevel(model, train, valid, hypergrad=method, curvature="gauss_newton", damping=0.1, iterations=400)
    engine.run()
    got = engine.status("upper").gradient["upper.value"]
    assert rel(got, expected) < 1e-8
    assert rel(got, reference(model, train, valid, damping=0.1)) > 1e-4  # the GGN is not this model's Hessian


def test_gauss_newton_fixed_point_equals_the_ggn_solve():
    """SGD with weight decay: w - Phi(w) = lr (grad f + wd w), so the GGN system is lr (G + wd I)."""
    train, valid = digits_like(9, 4, 3, 1), digits_like(5, 4, 3, 2)
    model = tanh_mlp(0)
    lam = Parameter(torch.zeros(9, dtype=DT))
    lower = WeightedFit(
        "lower", module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.2), data=[train],
        config=ProblemConfig(hypergrad="fixed_point", curvature="gauss_newton", iterations=3000),
    )
    upper = Validation("upper", module=lam, optimizer=torch.optim.SGD(lam.parameters(), lr=0.0), data=[valid])
    engine = Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, EngineConfig(train_iters=1))
    engine.run()  # the lower steps first; the push is at its new weights, which the reference reads
    expected = reference(model, train, valid, damping=0.2, gauss_newton=True)
    assert rel(engine.status("upper").gradient["upper.value"], expected) < 1e-8


# --------------------------------------------------------------------------- KFAC factors
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.head = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_kfac_factors_equal_brute_force_per_example_kronecker_sums():
    torch.manual_seed(0)
    model = ConvNet().to(DT)
    n = 5
    x, y = torch.randn(n, 2, 5, 5, dtype=DT), torch.randint(0, 4, (n,))
    weights = torch.rand(n, dtype=DT)

    def loss_fn(z: torch.Tensor) -> torch.Tensor:
        return (weights * F.cross_entropy(z, y, reduction="none")).mean()

    params = dict(model.named_parameters())
    w = {f"lower.{k}": t for k, t in params.items()}
    blocks = blocks_of(model, "lower", w)
    assert [b.weight for b in blocks] == ["lower.conv.weight", "lower.head.weight"]
    factors = kronecker_factors(lambda: (model(x), loss_fn), blocks)

    # brute force, one example (and one output position) at a time
    conv, head = model.conv, model.head
    padded = F.pad(x, (1, 1, 1, 1))
    z = model(x)
    h_out = hessian(lambda zz: loss_fn(zz.reshape(z.shape)), z.reshape(-1)).reshape(n, 4, n, 4)
    a_conv, g_conv, a_head, g_head = 0.0, 0.0, 0.0, 0.0
    positions = [(i, j) for i in range(3) for j in range(3)]
    for e in range(n):
        pre = conv(x[e : e + 1])[0]  # (3, 3, 3): channels x positions
        hidden = torch.tanh(pre).reshape(-1)
        h_e = h_out[e, :, e, :]
        j_conv = jacobian(lambda p: head(torch.tanh(p).reshape(1, -1))[0], pre).reshape(4, 3, 9)
        for t, (i, j) in enumerate(positions):
            patch = torch.cat([padded[e, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(-1), torch.ones(1, dtype=DT)])
            a_conv = a_conv + torch.outer(patch, patch) / (n * 9)
            g_conv = g_conv + j_conv[:, :, t].T @ h_e @ j_conv[:, :, t]
        a = torch.cat([hidden, torch.ones(1, dtype=DT)])
        a_head = a_head + torch.outer(a, a) / n
        g_head = g_head + h_e  # d outputs / d head's outputs is the identity
    expected = {"lower.conv.weight": (a_conv, g_conv), "lower.head.weight": (a_head, g_head)}
    for key, (a, g) in expected.items():
        assert rel(factors[key][0].detach(), a) < 1e-12, key
        assert rel(factors[key][1].detach(), g) < 1e-12, key


# --------------------------------------------------------------------------- KFAC as a solver
def softmax_regression(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3).to(DT)


@pytest.mark.parametrize("damping", [0.1, 1e-3])
def test_pure_kfac_is_exact_for_softmax_regression_on_one_example(damping):
    """One example through one linear layer: H = (a a^T) ⊗ H_out exactly, so (A ⊗ G + d I)^-1 is the solve."""
    train, valid = digits_like(1, 4, 3, 1), digits_like(5, 4, 3, 2)
    model = softmax_regression(0)
    engine = bilevel(model, train, valid, hypergrad="kfac", iterations=0, damping=damping, kfac_damping=damping)
    engine.run()
    info = engine.status("upper").diagnostics["lower"].solve
    assert info.solver == "kfac" and info.products == 0
    got = engine.status("upper").gradient["upper.value"]
    assert rel(got, reference(model, train, valid, damping=damping)) < 1e-10


def test_pure_kfac_is_approximate_on_more_examples():
    train, valid = digits_like(6, 4, 3, 1), digits_like(5, 4, 3, 2)
    model = softmax_regression(0)
    engine = bilevel(model, train, valid, hypergrad="kfac", iterations=0, damping=0.1, kfac_damping=0.1)
    engine.run()
    got = engine.status("upper").gradient["upper.value"]
    assert rel(got, reference(model, train, valid, damping=0.1)) > 1e-3


def test_kfac_reaches_the_exact_hypergradient_with_fewer_products_than_cg():
    """Softmax regression on features whose scales span three decades: condition number ~1e6, which A captures."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 8, generator=g, dtype=DT) * torch.logspace(-2, 1, 8, dtype=DT)
    train, valid = (x, torch.randint(0, 4, (60,), generator=g)), (x[:10], torch.randint(0, 4, (10,), generator=g))
    torch.manual_seed(0)
    model = nn.Linear(8, 4).to(DT)
    expected = reference(model, train, valid, damping=1e-4)
    results = {}
    for method in ("cg", "kfac"):
        engine = bilevel(model, train, valid, hypergrad=method, damping=1e-4, iterations=2000, tol=1e-10)
        engine.run()
        info = engine.status("upper").diagnostics["lower"].solve
        assert info.outcome == "converged" and not info.negative_curvature, info.describe()
        results[method] = (rel(engine.status("upper").gradient["upper.value"], expected), info.products)
    assert results["cg"][0] < 1e-6 and results["kfac"][0] < 1e-6, results
    assert results["kfac"][1] < results["cg"][1] / 2, results


# --------------------------------------------------------------------------- errors and negative curvature
@pytest.mark.parametrize("config", [{"hypergrad": "kfac"}, {"hypergrad": "cg", "curvature": "gauss_newton"}])
def test_a_problem_without_output_loss_gets_an_error_naming_it_and_the_fix(config):
    train, valid = digits_like(3, 4, 3, 1), digits_like(3, 4, 3, 2)
    with pytest.raises(ValueError, match=r"problem 'lower' uses .*defines no output_loss\(self, batch\).*loss_fn\(outputs\)"):
        bilevel(softmax_regression(0), train, valid, lower_cls=NoSplit, **config)


def test_cg_on_negative_curvature_continues_with_minres_and_says_so(caplog):
    """The default cg on an indefinite Hessian: MINRES answers exactly, and the log says what happened and the fixes."""
    train, valid = digits_like(9, 4, 3, 1), digits_like(5, 4, 3, 2)
    model = tanh_mlp(0)  # untrained: its Hessian has negative eigenvalues (checked in the GGN test)
    expected = reference(model, train, valid, damping=0.0)
    engine = bilevel(model, train, valid, hypergrad="cg", iterations=400)
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        engine.run()
    info = engine.status("upper").diagnostics["lower"].solve
    assert info.negative_curvature and info.solver == "cg+minres" and info.outcome == "converged"
    assert rel(engine.status("upper").gradient["upper.value"], expected) < 1e-6
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "indefinite" in logged and "MINRES" in logged and "curvature='gauss_newton'" in logged


class Gain(nn.Module):
    """An elementwise gain: a parameter no Kronecker block covers."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 2.0, size, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_kfac_keeps_parameters_outside_its_layers_and_still_converges_exactly():
    """A preconditioner that dropped the gain would leave PCG unable to move it: the exact answer proves it is kept."""
    train, valid = digits_like(12, 4, 3, 1), digits_like(5, 4, 3, 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), Gain(5), nn.Linear(5, 3)).to(DT)
    expected = reference(model, train, valid, damping=0.05)
    engine = bilevel(model, train, valid, hypergrad="kfac", damping=0.05, iterations=500, tol=1e-12)
    engine.run()
    info = engine.status("upper").diagnostics["lower"].solve
    assert info.outcome == "converged"
    assert rel(engine.status("upper").gradient["upper.value"], expected) < 1e-8


def test_kfac_factors_are_refreshed_every_kfac_refresh_solves():
    """Pure KFAC shows its factors: with kfac_refresh=2 the second step reuses the first step's, the third refreshes."""
    train, valid = digits_like(6, 4, 3, 1), digits_like(5, 4, 3, 2)
    gradients = {}
    for refresh in (1, 2):
        lam = Parameter(torch.zeros(6, dtype=DT))
        model = softmax_regression(0)
        lower = WeightedFit(
            "lower", module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), data=[train],
            config=ProblemConfig(hypergrad="kfac", iterations=0, damping=0.1, kfac_refresh=refresh),
        )
        upper = Validation("upper", module=lam, optimizer=torch.optim.SGD(lam.parameters(), lr=0.0), data=[valid])
        engine = Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, EngineConfig(train_iters=3))
        gradients[refresh] = []
        for _ in range(3):
            engine.run(iterations=1)
            gradients[refresh].append(engine.status("upper").gradient["upper.value"].detach().clone())
    fresh, stale = gradients[1], gradients[2]
    assert rel(stale[0], fresh[0]) < 1e-14 and rel(stale[2], fresh[2]) < 1e-14
    assert rel(stale[1], fresh[1]) > 1e-6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"curvature": "gn"}, r"curvature='gn' is invalid: choose one of \['hessian', 'gauss_newton'\]"),
        ({"hypergrad": "darts", "curvature": "gauss_newton"}, r"curvature='gauss_newton' is invalid: it applies to the implicit"),
        ({"hypergrad": "cg", "iterations": 0}, r"iterations=0 is invalid: .*only with hypergrad='kfac'"),
        ({"hypergrad": "kfac", "kfac_refresh": 0}, r"kfac_refresh=0 is invalid: use an integer >= 1"),
        ({"hypergrad": "kfac", "kfac_damping": -1.0}, r"kfac_damping=-1.0 is invalid: use a finite positive number"),
    ],
)
def test_curvature_and_kfac_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProblemConfig(**kwargs)
