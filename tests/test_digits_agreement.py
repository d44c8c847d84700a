"""On a real model (a digits MLP at a converged inner solution) the exact methods agree with each other.

The lower problem trains a 64-8-10 MLP (610 parameters) in float64 on 200 digits with learnable per-example weights
(the upper parameters) and an L2 term that makes its Hessian positive definite; it is first solved
to a stationary point with L-BFGS. Then cg, neumann and fixed_point are compared with the dense
float64 reference of ``check_hypergradient`` and with each other.
"""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig, check_hypergradient

L2 = 1e-2


class WeightedMLP(Problem):
    def training_step(self, batch):
        x, y = batch
        weights = torch.sigmoid(self.weights.module.logits)
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        penalty = sum((p**2).sum() for p in self.module.parameters())
        return (weights * losses).mean() + 0.5 * L2 * penalty


class Validation(Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.mlp(x), y)


class Logits(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(-1, 1, n, dtype=torch.float64))


@pytest.fixture(scope="module")
def converged_engine():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    train, valid = (x[:200], y[:200]), (x[200:400], y[200:400])
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    weights = Logits(200)
    lower = WeightedMLP(
        "mlp",
        module=mlp,
        optimizer=torch.optim.SGD(mlp.parameters(), lr=0.5),
        data=[train],
        config=ProblemConfig(iterations=3000),
    )
    upper = Validation(
        "weights", module=weights, optimizer=torch.optim.SGD(weights.parameters(), lr=0.0), data=[valid]
    )
    engine = Engine(
        [upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, EngineConfig(train_iters=1)
    )
    solver = torch.optim.LBFGS(
        mlp.parameters(),
        lr=1,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        solver.zero_grad()
        loss = engine.problems["mlp"].training_step(train)
        loss.backward()
        return loss

    solver.step(closure)
    grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in mlp.parameters()))
    assert grad_norm < 1e-6, f"inner problem not converged: gradient norm {grad_norm:.2e}"
    return engine


def test_implicit_methods_agree_with_the_exact_reference_and_each_other(converged_engine):
    grads = {}
    for method in ("cg", "neumann", "fixed_point"):
        (report,) = check_hypergradient(converged_engine, method=method, reference="exact")
        assert report.cosine > 0.99, (method, report.cosine)
        # cg converges to the solve's precision; the step-size series (neumann, fixed_point) stop at
        # their iteration budget on this ill-conditioned Hessian, hence the looser bound
        assert report.relative_error < (1e-6 if method == "cg" else 1e-2), (method, report.relative_error)
        grads[method] = report.grad["weights.logits"]
    for a in grads:
        for b in grads:
            assert F.cosine_similarity(grads[a], grads[b], dim=0) > 0.99


@pytest.mark.slow
def test_unroll_reference_agrees_at_the_stationary_point(converged_engine):
    (report,) = check_hypergradient(converged_engine, method="cg", reference="fixed_point")
    assert report.relative_error < 1e-4 and report.cosine > 0.99


def test_approximations_are_reported_with_their_error(converged_engine):
    (report,) = check_hypergradient(converged_engine, method="darts", reference="exact")
    assert report.relative_error > 0.0 and -1.0 <= report.cosine <= 1.0
