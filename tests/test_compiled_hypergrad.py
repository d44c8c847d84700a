"""``compile_hypergrad``: compiled Hessian-vector products and solver blocks give the eager hypergradient, and fall back loudly.

Everything runs in float64. Two references: the same engine with eager products (reverse over reverse on
the residual's graph), which solves the same system and so differs by rounding only (asserted to 1e-12);
and, independent of the code under test, the hypergradient from a dense Hessian and ``torch.linalg.solve``
written here in plain torch. The solves are damped so that they converge well inside the iteration budget
(the comparison is then not at the mercy of how a truncated iteration amplifies rounding). Compilation
takes tens of seconds per captured graph on a small shared CPU, so those tests are marked slow; the
fallback test and the block semantics (on an eager stand-in for the compiled block) run by default.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.execution import CompiledHVP
from betty_like.hypergrad import conjugate_gradient, hypergradient

REL = 1e-12
DAMPING = 1.0
LR = 0.1


class Classifier(Problem):
    """Lower level: a small MLP classifier, each example's loss weighted by the upper problem."""

    def training_step(self, batch):
        x, y = batch
        losses = nn.functional.cross_entropy(self.module(x), y, reduction="none")
        return (torch.sigmoid(self.weights.module.logits) * losses).mean()


class Branchy(Classifier):
    """A loss that reads a value back to Python and branches on it: no graph can be captured around it."""

    def training_step(self, batch):
        loss = super().training_step(batch)
        return loss * 2 if loss.item() > 1e9 else loss


class Validation(Problem):
    def training_step(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.classifier(x), y)


class Logits(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(-1.0, 1.0, n, dtype=torch.float64))


def batches(n: int, seed: int, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)) for _ in range(count)]


def engine_for(method: str, compile_hypergrad, cls=Classifier, dropout=None, count: int = 2, **config) -> Engine:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    if dropout is not None:
        net.insert(1, nn.Dropout(dropout))
    weights = Logits(8)
    lower = cls(
        "classifier",
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        data=batches(8, 0, count),
        config=ProblemConfig(hypergrad=method, compile_hypergrad=compile_hypergrad,
                             **{"unroll_steps": 2, "damping": DAMPING, "iterations": 200, "tol": 1e-13, **config}),
    )
    upper = Validation("weights", module=weights, optimizer=torch.optim.SGD(weights.parameters(), lr=0.1), data=batches(8, 1, count))
    return Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, EngineConfig(train_iters=2))


def hypergradient_after_steps(method: str, compile_hypergrad, **options) -> dict[str, torch.Tensor]:
    """The upper problem's gradient after two lower steps and one upper step."""
    engine = engine_for(method, compile_hypergrad, **options)
    engine.run()
    status = engine.status("weights")
    assert status.steps == 1
    return status.gradient


def dense_hypergradient(engine: Engine, scale: float) -> torch.Tensor:
    """``-(scale d2f/dlam dw)^T (scale H + damping I)^-1 dF/dw`` from a dense Hessian, in plain torch.

    ``scale`` is 1 for the gradient residual (cg, neumann) and the SGD learning rate for the update residual
    ``w - (w - lr grad f)`` of fixed_point. One batch per problem, so the current ones are known.
    """
    net = engine.problems["classifier"].module
    lam = engine.problems["weights"].module.logits.detach()
    (x, y), (xv, yv) = engine.problems["classifier"].data[0], engine.problems["weights"].data[0]
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def params(v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(names, v.split([s.numel() for s in shapes]), shapes, strict=True)}

    def inner(v: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        losses = nn.functional.cross_entropy(functional_call(net, params(v), (x,)), y, reduction="none")
        return (torch.sigmoid(lam) * losses).mean()

    def outer(v: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(net, params(v), (xv,)), yv)

    hessian = torch.autograd.functional.hessian(lambda v: inner(v, lam), flat)
    system = scale * hessian + DAMPING * torch.eye(flat.numel(), dtype=torch.float64)
    u = torch.linalg.solve(system.T, grad(outer)(flat))
    mixed = jacrev(lambda lam: grad(inner)(flat, lam))(lam)  # d(grad_w f)/dlam, [d, n]
    return -scale * mixed.T @ u


def at_fixed_state(method: str, compile_hypergrad, **config):
    """The upper hypergradient at the state after one engine iteration (one batch per problem), its lower
    solve's diagnostics, and the dense reference at that state."""
    engine = engine_for(method, compile_hypergrad, count=1, **config)
    engine.run(1)
    result = hypergradient(engine.program(), "weights")
    scale = LR if method == "fixed_point" else 1.0
    return result.gradient["weights.logits"], result.infos["classifier"].solve, dense_hypergradient(engine, scale)


@pytest.fixture
def compiled_products(monkeypatch):
    """Counts the products that ran compiled, one at a time or in blocks (so that a silent eager path
    cannot pass for a compiled one)."""
    count = {"single": 0, "in blocks": 0}
    at = CompiledHVP.at

    def counting(self, w, others):
        products = at(self, w, others)
        if products is None:
            return None

        def product(u):
            count["single"] += 1
            return products.product(u)

        def repeat(step, state, n, damping):
            count["in blocks"] += n
            return products.repeat(step, state, n, damping)

        return type(products)(product, repeat)

    monkeypatch.setattr(CompiledHVP, "at", counting)
    return count


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cg", "neumann", "fixed_point"])
def test_compiled_hypergradients_equal_eager_and_the_dense_solve(method, caplog, compiled_products):
    eager, eager_info, dense = at_fixed_state(method, False)
    assert sum(compiled_products.values()) == 0
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        compiled, info, _ = at_fixed_state(method, True)
    assert not [r for r in caplog.records if "compile_hypergrad" in r.getMessage()]  # it did not fall back
    ran = compiled_products["in blocks" if method == "cg" else "single"]
    assert ran >= info.iterations >= 5, compiled_products  # the solve's iterations ran compiled (cg: in blocks)
    assert gap(compiled, eager) < REL
    assert gap(eager, dense) < 1e-10 and gap(compiled, dense) < 1e-10
    assert (info.outcome, info.iterations, info.products) == (eager_info.outcome, eager_info.iterations, eager_info.products)


@pytest.mark.slow
def test_cg_blocks_of_several_iterations_keep_the_eager_solve(compiled_products):
    """Blocks of 4 iterations between checks (the last one shorter) give the eager answer and history."""
    eager, eager_info, dense = at_fixed_state("cg", False, solver_check_every=4, iterations=14, tol=1e-9)
    compiled, info, _ = at_fixed_state("cg", True, solver_check_every=4, iterations=14, tol=1e-9)
    assert compiled_products["in blocks"] >= info.iterations
    assert gap(compiled, eager) < REL
    assert gap(compiled, dense) < 1e-6
    assert (info.outcome, info.iterations, info.products) == (eager_info.outcome, eager_info.iterations, eager_info.products)
    assert max(abs(a - b) / b for a, b in zip(info.residuals, eager_info.residuals, strict=True)) < 1e-9


@pytest.mark.slow
def test_products_and_blocks_are_captured_once_and_not_recompiled_at_later_steps(compiled_products):
    """Parameters, vectors and the solver state are graph inputs: new values at later steps reuse the graphs."""
    engine = engine_for("cg", True, count=1, solver_check_every=3)
    engine.run(2)  # the first upper step (the lower takes unroll_steps=2 steps per upper step)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    ran = compiled_products["in blocks"]
    assert graphs > 0 and ran > 0
    engine.run(4)
    assert compiled_products["in blocks"] > ran  # the later solves ran in blocks
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_compiled_products_after_steps_give_the_eager_hypergradient():
    """Two lower steps and one upper step through the engine (the trained state, not a fixed one)."""
    assert relative(hypergradient_after_steps("cg", True), hypergradient_after_steps("cg", False)) < REL


@pytest.mark.slow
def test_auto_times_both_and_keeps_one_giving_the_eager_hypergradient(caplog):
    eager = hypergradient_after_steps("cg", False)
    with caplog.at_level(logging.INFO, logger="betty_like"):
        auto = hypergradient_after_steps("cg", "auto")
    chosen = [r.getMessage() for r in caplog.records if "compile_hypergrad='auto' chose" in r.getMessage()]
    assert len(chosen) == 1 and "'classifier'" in chosen[0], chosen
    assert relative(auto, eager) < REL


def test_a_model_that_cannot_be_captured_falls_back_with_one_log_line(caplog, compiled_products):
    eager = hypergradient_after_steps("cg", False, cls=Branchy)
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        fallen = hypergradient_after_steps("cg", True, cls=Branchy)
    lines = [r.getMessage() for r in caplog.records if "compile_hypergrad" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "'classifier'" in lines[0] and "could not capture" in lines[0] and "eager" in lines[0]
    assert sum(compiled_products.values()) == 0
    assert relative(fallen, eager) == 0.0  # the eager products themselves


@pytest.mark.slow
def test_a_block_that_cannot_be_captured_runs_on_compiled_products_with_one_log_line(caplog, monkeypatch, compiled_products):
    """A CG step with a graph break cannot be one graph: its iterations run one compiled product at a time."""
    eager, _, _ = at_fixed_state("cg", False)
    plain = importlib.import_module("betty_like.hypergrad._linsolve").cg_step

    def branchy(matvec, state, preconditioner=None):
        torch._dynamo.graph_break()  # what a host read or an untraceable call does to a capture
        return plain(matvec, state, preconditioner)

    monkeypatch.setattr("betty_like.hypergrad._linsolve.cg_step", branchy)
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        compiled, info, _ = at_fixed_state("cg", True)
    lines = [r.getMessage() for r in caplog.records if "compile_hypergrad" in r.getMessage()]
    assert len(lines) == 1 and "'classifier'" in lines[0] and "solver iterations as one graph" in lines[0], lines
    assert compiled_products["in blocks"] >= info.iterations  # asked for blocks, ran them on compiled products
    assert gap(compiled, eager) < REL


def test_training_mode_dropout_uses_eager_products_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        hypergradient_after_steps("cg", True, dropout=0.5, fixed_randomness=True)
    lines = [r.getMessage() for r in caplog.records if "compile_hypergrad" in r.getMessage()]
    assert len(lines) == 1 and "'classifier'" in lines[0] and "dropout" in lines[0], lines


@pytest.mark.parametrize(
    ("eigenvalues", "iterations", "tol", "outcome"),
    [
        ([1.0, 2.0, 3.0, 5.0, 8.0], 12, 1e-10, "converged"),
        ([1.0, 2.0, 3.0, 50.0, 800.0], 3, 1e-10, "out_of_iterations"),
        ([1.0, -2.0, 3.0, 5.0, 8.0], 12, 1e-10, "converged"),  # negative curvature: continued by MINRES
        ([1.0, float("nan"), 3.0, 5.0, 8.0], 12, 1e-10, "non_finite"),
    ],
)
@pytest.mark.parametrize("check_every", [1, 2, 5])
def test_cg_in_blocks_reports_exactly_as_eager(eigenvalues, iterations, tol, outcome, check_every):
    """The block path (here an eager stand-in for the compiled block) gives the eager answer and report."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=g))
    matrix = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    b = {"a": torch.randn(2, dtype=torch.float64, generator=g), "b": torch.randn(3, dtype=torch.float64, generator=g)}

    def matvec(u):
        out = matrix @ torch.cat([u["a"], u["b"]])
        return {"a": out[:2], "b": out[2:]}

    blocks = []

    def repeat(step, state, n):  # what a compiled block computes, run eagerly
        blocks.append(n)
        rows = []
        for _ in range(n):
            state, row = step(matvec, state)
            rows.append(row)
        return state, torch.stack(rows)

    x, info = conjugate_gradient(matvec, b, iterations=iterations, tol=tol, check_every=check_every)
    y, block_info = conjugate_gradient(matvec, b, iterations=iterations, tol=tol, check_every=check_every, repeat=repeat)
    assert blocks and all(n <= check_every for n in blocks)
    assert info.outcome == outcome
    assert info.negative_curvature == any(e < 0 for e in eigenvalues)
    assert repr(vars(block_info)) == repr(vars(info))  # outcome, iterations, products, residual history
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=0, atol=0, equal_nan=True)


def test_invalid_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"compile_hypergrad='yes'.*False, True or 'auto'"):
        ProblemConfig(compile_hypergrad="yes")
    with pytest.raises(ValueError, match=r"solver_check_every=0.*integer >= 1"):
        ProblemConfig(solver_check_every=0)
