"""``compile_hypergrad``: compiled Hessian-vector products give the eager hypergradient, and fall back loudly.

Everything runs in float64. The reference is the same engine with eager products (reverse over reverse on the residual's graph):
both solve the same system, so in float64 they differ by rounding only. The solves are damped so that
they converge well inside the iteration budget (the comparison is then not at the mercy of how a
truncated iteration amplifies rounding). Compilation takes seconds per captured graph, so these
tests are marked slow; the fallback test compiles nothing and runs by default.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.execution import CompiledHVP

REL = 1e-12


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


def batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)) for _ in range(2)]


def hypergradient(method: str, compile_hypergrad, cls=Classifier, dropout=None, **config) -> dict[str, torch.Tensor]:
    """The upper problem's gradient after two lower steps and one upper step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    if dropout is not None:
        net.insert(1, nn.Dropout(dropout))
    weights = Logits(8)
    lower = cls(
        "classifier",
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        data=batches(8, 0),
        config=ProblemConfig(hypergrad=method, unroll_steps=2, damping=1.0, iterations=200, tol=1e-13,
                             compile_hypergrad=compile_hypergrad, **config),
    )
    upper = Validation("weights", module=weights, optimizer=torch.optim.SGD(weights.parameters(), lr=0.1), data=batches(8, 1))
    engine = Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, EngineConfig(train_iters=2))
    engine.run()
    status = engine.status("weights")
    assert status.steps == 1
    return status.gradient


@pytest.fixture
def compiled_products(monkeypatch):
    """Counts the products that ran compiled (so that a silent eager path cannot pass for a compiled one)."""
    count = [0]
    at = CompiledHVP.at

    def counting(self, w, others):
        product = at(self, w, others)
        if product is None:
            return None

        def counted(u):
            count[0] += 1
            return product(u)

        return counted

    monkeypatch.setattr(CompiledHVP, "at", counting)
    return count


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cg", "neumann", "fixed_point"])
def test_compiled_products_give_the_eager_hypergradient(method, caplog, compiled_products):
    eager = hypergradient(method, False)
    assert compiled_products[0] == 0
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        compiled = hypergradient(method, True)
    assert not [r for r in caplog.records if "compile_hypergrad" in r.getMessage()]  # it did not fall back
    assert compiled_products[0] >= 5  # the solve's iterations
    assert relative(compiled, eager) < REL


@pytest.mark.slow
def test_auto_times_both_and_keeps_one_giving_the_eager_hypergradient(caplog):
    eager = hypergradient("cg", False)
    with caplog.at_level(logging.INFO, logger="betty_like"):
        auto = hypergradient("cg", "auto")
    chosen = [r.getMessage() for r in caplog.records if "compile_hypergrad='auto' chose" in r.getMessage()]
    assert len(chosen) == 1 and "'classifier'" in chosen[0], chosen
    assert relative(auto, eager) < REL


def test_a_model_that_cannot_be_captured_falls_back_with_one_log_line(caplog, compiled_products):
    eager = hypergradient("cg", False, cls=Branchy)
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        fallen = hypergradient("cg", True, cls=Branchy)
    lines = [r.getMessage() for r in caplog.records if "compile_hypergrad" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "'classifier'" in lines[0] and "could not capture" in lines[0] and "eager" in lines[0]
    assert compiled_products[0] == 0
    assert relative(fallen, eager) == 0.0  # the eager products themselves


def test_training_mode_dropout_uses_eager_products_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        hypergradient("cg", True, dropout=0.5, fixed_randomness=True)
    lines = [r.getMessage() for r in caplog.records if "compile_hypergrad" in r.getMessage()]
    assert len(lines) == 1 and "'classifier'" in lines[0] and "dropout" in lines[0], lines


def test_invalid_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"compile_hypergrad='yes'.*False, True or 'auto'"):
        ProblemConfig(compile_hypergrad="yes")
    with pytest.raises(ValueError, match=r"solver_check_every=0.*integer >= 1"):
        ProblemConfig(solver_check_every=0)
