"""Mixed precision: low-precision forwards, fp32 second-order arithmetic, fp16 loss scaling on every gradient.

The agreement tests take one hypergradient step of the upper problem from the same converged state of a
digits MLP (float32, solved by L-BFGS) in fp32, bf16 and fp16, and compare the hypergradients by cosine.
"""

import copy
import logging

import dist_worker
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from test_digits_agreement import L2, Validation, WeightedMLP
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC2701 (torch has no public dispatch-mode recorder)
from toy import bilevel

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.hypergrad import conjugate_gradient, total_derivative
from betty_like.precision import unit_norm


class Logits(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(-1, 1, n))


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    train, valid = (x[:200], y[:200]), (x[200:400], y[200:400])
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    weights = Logits(200)
    solver = torch.optim.LBFGS(
        mlp.parameters(), lr=1, max_iter=300, tolerance_grad=1e-7, tolerance_change=0, line_search_fn="strong_wolfe"
    )

    def closure():
        solver.zero_grad()
        x_, y_ = train
        w = torch.sigmoid(weights.logits)
        loss = (w * F.cross_entropy(mlp(x_), y_, reduction="none")).mean()
        loss = loss + 0.5 * L2 * sum((p**2).sum() for p in mlp.parameters())
        loss.backward()
        return loss

    solver.step(closure)
    return mlp, weights, train, valid


def upper_gradient(digits, precision: str, config: ProblemConfig) -> torch.Tensor:
    """The upper problem's first hypergradient from the converged state, at ``precision``."""
    mlp, weights, train, valid = (copy.deepcopy(digits[0]), copy.deepcopy(digits[1]), *digits[2:])
    lower = WeightedMLP(
        "mlp", module=mlp, optimizer=torch.optim.SGD(mlp.parameters(), lr=0.5), data=[train], config=config
    )
    upper = Validation("weights", module=weights, optimizer=torch.optim.SGD(weights.parameters(), lr=0.0), data=[valid])
    engine = Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        EngineConfig(train_iters=1, precision=precision),
    )
    engine.run()
    return engine.status("weights").gradient["weights.logits"]


CONFIGS = {
    "cg": ProblemConfig(hypergrad="cg", iterations=500),
    "neumann": ProblemConfig(hypergrad="neumann", iterations=300, damping=0.5),
    "fixed_point": ProblemConfig(hypergrad="fixed_point", iterations=300, damping=0.5),
    "unroll": ProblemConfig(hypergrad="unroll"),
    "darts": ProblemConfig(hypergrad="darts"),
}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_low_precision_hypergradients_agree_with_fp32(digits, method, precision):
    reference = upper_gradient(digits, "fp32", CONFIGS[method])
    low = upper_gradient(digits, precision, CONFIGS[method])
    assert reference.norm() > 0
    assert torch.isfinite(low).all()
    cosine = F.cosine_similarity(reference, low, dim=0)
    assert cosine > 0.99, f"{method} {precision}: cosine {cosine:.5f}"


class LowPrecisionOps(TorchDispatchMode):
    """Counts ops whose output is a half type."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16):
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("hvp_precision", ["fp32", "autocast"])
def test_hvp_graph_holds_no_low_precision_op_under_fp32(digits, monkeypatch, hvp_precision):
    recorded = []
    original = total_derivative._Responder.push

    def recording_push(self, v, inputs, outputs):
        with LowPrecisionOps() as mode:
            result = original(self, v, inputs, outputs)
        recorded.extend(mode.ops)
        return result

    monkeypatch.setattr(total_derivative._Responder, "push", recording_push)
    config = ProblemConfig(hypergrad="cg", iterations=50, damping=0.1, hvp_precision=hvp_precision)
    upper_gradient(digits, "bf16", config)
    if hvp_precision == "fp32":
        assert recorded == []
    else:  # the check can fail: the autocast graph does hold bf16 ops
        assert recorded


class PlantedOuter(Problem):
    """Its loss has a term whose fp16 cotangent is ``20 * loss_scale``: above fp16's 65504 at scale 4096."""

    def training_step(self, batch):
        x, y = batch
        fit = ((self.inner(x).squeeze(-1) - y) ** 2).mean()
        return fit + 20.0 * self.module.scale.half().float()


@pytest.mark.parametrize("method", ["cg", "unroll"])
def test_fp16_overflow_skips_the_upper_step_halves_the_scale_and_logs(caplog, method):
    engine, _, outer = bilevel(
        ProblemConfig(hypergrad=method, damping=0.1),
        engine_config=EngineConfig(train_iters=2, precision="fp16", loss_scale=4096.0),
        outer_cls=PlantedOuter,
        outer_lr=0.1,
    )
    before = outer.module.scale.detach().clone()
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        engine.run(1)
    assert torch.equal(outer.module.scale.detach(), before)
    assert engine._precision.scale == 2048.0
    assert engine.status("outer").skipped == 1
    assert any("'outer'" in r.message and "skipped" in r.message for r in caplog.records)
    engine.run(1)  # at 2048 the cotangent fits: the step is taken
    assert not torch.equal(outer.module.scale.detach(), before)
    assert engine._precision.scale == 2048.0


def test_unit_norm_products_keep_a_scaled_fp16_solve_finite():
    torch.manual_seed(0)
    m = torch.randn(10, 10)
    a = m @ m.T / 10 + torch.eye(10)

    def fp16_matvec(u):  # a product computed in fp16, as under hvp_precision="autocast"
        return {"w": (a.half() @ u["w"].half()).float()}

    b = {"w": 4096.0 * 25.0 * torch.randn(10)}  # a cotangent at loss scale 4096
    plain, _ = conjugate_gradient(fp16_matvec, b, iterations=50, tol=1e-3)
    assert not torch.isfinite(plain["w"]).all()
    fixed, _ = conjugate_gradient(unit_norm(fp16_matvec), b, iterations=50, tol=1e-3)
    exact = torch.linalg.solve(a, b["w"])
    assert torch.isfinite(fixed["w"]).all()
    assert torch.linalg.norm(fixed["w"] - exact) / torch.linalg.norm(exact) < 1e-2


def test_fp16_adjoint_solves_at_three_levels_stay_finite_and_agree_with_fp32():
    """fixed_point's adjoint system is solved with transposed products (its update's Jacobian is not taken as
    symmetric); the transpose is taken of the raw product, then wrapped: a transposed unit-norm product would be
    differentiated at the zero vector, where its norm has no derivative, and every top step was NaN (skipped)."""
    gradients = {}
    for precision in ("fp32", "fp16"):
        engine, top = dist_worker.build("fixed_point/3", False, precision=precision, train_iters=2)
        engine.run()
        status = engine.status(top)
        assert status.skipped == 0 and status.gradient is not None, precision
        gradients[precision] = torch.cat([g.reshape(-1) for g in status.gradient.values()])
    fp32, fp16 = gradients["fp32"], gradients["fp16"]
    assert torch.isfinite(fp16).all()
    assert float((fp16 - fp32).norm() / fp32.norm()) < 1e-2  # measured 4e-4


def test_precision_config_is_validated():
    with pytest.raises(ValueError, match="precision='fp8'"):
        EngineConfig(precision="fp8")
    with pytest.raises(ValueError, match="hvp_precision='bf16'"):
        ProblemConfig(hvp_precision="bf16")
    with pytest.raises(ValueError, match="loss_scale=0"):
        EngineConfig(loss_scale=0)


def test_captured_steps_refuse_low_precision_and_auto_runs_eager(caplog):
    """A captured step has no autocast scope or loss scaler: compiled is refused, auto says it runs eager."""
    with pytest.raises(ValueError, match=r"problem 'inner': execution='compiled' cannot run under EngineConfig\(precision='bf16'\)"):
        bilevel(ProblemConfig(execution="compiled"), engine_config=EngineConfig(train_iters=2, precision="bf16"))
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        engine, _, _ = bilevel(
            ProblemConfig(execution="auto", hypergrad="cg", damping=0.1),
            engine_config=EngineConfig(train_iters=2, precision="bf16"),
        )
        engine.run()
    assert engine.execution_choices("inner") == {}
    assert sum("execution='auto' runs eager under EngineConfig(precision='bf16')" in r.message for r in caplog.records) == 1


def test_remat_is_refused_under_fp16_with_the_reason():
    with pytest.raises(ValueError, match=r"\['inner'\]: unroll_memory='remat'.*without the fp16 loss scaler.*'graph'"):
        bilevel(ProblemConfig(unroll_memory="remat"), engine_config=EngineConfig(train_iters=2, precision="fp16"))
