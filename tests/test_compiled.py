"""Captured (compiled) plain steps: same trajectory as eager, same hypergradients, clear errors.

Every comparison runs in float64, where the captured and eager steps differ only by rounding
(measured ~1e-16); the stated tolerance is 1e-9, well inside the 1e-6 the project asks of backends.
The models and batch shapes are shared between tests, so after the first compile inductor's cache
makes the others cheap.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from toy import Inner, Outer, Scale

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.execution import compiled

TOL = {"rtol": 0.0, "atol": 1e-9}
AUTO_DONE = 2 * compiled.TRIAL_STEPS + 8  # engine steps by which auto has measured both paths and decided


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class Fit(Problem):
    def training_step(self, batch):
        x, y = batch
        return ((self.module(x).squeeze(-1) - y) ** 2).mean()


class ReadsItem(Fit):
    """A loss that reads a value back to Python: a graph cannot be captured around it."""

    def training_step(self, batch):
        loss = super().training_step(batch)
        return loss * 2 if loss.item() > 1e9 else loss


class WeightedFit(Inner):
    """The toy lower problem without its call counter: a Python int it changes every step would be a
    new constant of the captured graph each time (see the recompile test below)."""

    def training_step(self, batch):
        x, y = batch
        return (self.outer.module.scale * (self.module(x).squeeze(-1) - y) ** 2).mean()


def data(n=3, rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 3, generator=g), torch.randn(rows, generator=g)) for _ in range(n)]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def single(execution, optimizer, cls=Fit, batches=None, iters=8, **config):
    net = mlp()
    opt = optimizer(net.parameters())
    problem = cls("fit", module=net, optimizer=opt, data=batches or data(), config=ProblemConfig(execution=execution, **config))
    engine = Engine([problem], config=EngineConfig(train_iters=iters))
    return engine, problem


def params(problem):
    return [p.detach().clone() for p in problem.module.parameters()]


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer):
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"], strict=True):
        sa, sb = a.state[pa], b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]):
                torch.testing.assert_close(sa[key], sb[key], **TOL)


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_steps_follow_the_eager_trajectory(name):
    runs = {}
    for execution in ("eager", "compiled"):
        engine, problem = single(execution, OPTIMIZERS[name])
        engine.run()
        runs[execution] = (engine, problem)
    (eager_engine, eager), (engine, captured) = runs["eager"], runs["compiled"]
    for a, b in zip(params(eager), params(captured), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert_same_state(eager.optimizer, captured.optimizer)
    for key, g in eager_engine.status("fit").gradient.items():
        torch.testing.assert_close(engine.status("fit").gradient[key], g, **TOL)
    (choice,) = engine.execution_choices("fit").values()
    assert choice.path == "compiled" and choice.compile_s > 0
    assert all(p.grad is None for p in captured.module.parameters())  # captured steps leave no stale .grad


def test_scheduler_and_clipping_carry_into_the_captured_step():
    results = []
    for execution in ("eager", "compiled"):
        net = mlp()
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        problem = Fit("fit", module=net, optimizer=opt, scheduler=scheduler, data=data(),
                      config=ProblemConfig(execution=execution, grad_clip=0.05))
        Engine([problem], config=EngineConfig(train_iters=7)).run()
        results.append((params(problem), opt.param_groups[0]["lr"]))
    assert results[0][1] == results[1][1] == pytest.approx(0.05 * 0.5**3)
    for a, b in zip(results[0][0], results[1][0], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_non_finite_loss_skips_the_captured_step_without_writing():
    batches = data()
    batches[1] = (batches[1][0], torch.full_like(batches[1][1], float("nan")))
    engine, problem = single("compiled", OPTIMIZERS["sgd_momentum"], batches=batches, iters=6, on_nonfinite="skip")
    reference, ref_problem = single("eager", OPTIMIZERS["sgd_momentum"], batches=batches, iters=6, on_nonfinite="skip")
    engine.run()
    reference.run()
    assert engine.status("fit").skipped == reference.status("fit").skipped == 2
    for a, b in zip(params(ref_problem), params(problem), strict=True):
        torch.testing.assert_close(a, b, **TOL)
        assert torch.isfinite(b).all()


class PoisonedGradient(Fit):
    """Finite loss, NaN gradient of the first layer's weight on a batch whose marker is 0: ``where`` picks the
    finite branch, but the other branch's derivative (sqrt of a negative number) is NaN and reaches the weight."""

    def training_step(self, batch):
        x, y, marker = batch
        weight = self.module[0].weight
        guarded = torch.where(marker > 1, torch.sqrt(marker * (1 + weight.sum() ** 2) - 1), torch.zeros(()))
        return super().training_step((x, y)) + guarded


def poisoned_batches():
    """Batch 2 (a captured step: the first step is eager) carries the marker that poisons the gradient."""
    return [(x, y, torch.tensor(0.0 if i == 2 else 2.0)) for i, (x, y) in enumerate(data(n=4))]


def test_a_nan_gradient_with_a_finite_loss_is_caught_by_the_captured_step():
    """The captured step computes the non-finite check's norms inside its graph: a NaN gradient entry is
    still named alone and refused before anything is written, or skipped as the eager step skips it."""
    engine, problem = single("compiled", OPTIMIZERS["sgd_momentum"], cls=PoisonedGradient, batches=poisoned_batches(), iters=6)
    engine.run(2)  # eager (creates the optimizer state), then the first captured step
    assert [c.path for c in engine.execution_choices("fit").values()] == ["compiled"]
    before = params(problem)
    with pytest.raises(FloatingPointError, match=r"gradient is NaN/inf in \['fit\.0\.weight'\] while its loss is finite"):
        engine.run(1)
    assert all(torch.equal(a, b) for a, b in zip(before, params(problem), strict=True))
    runs = {}
    for execution in ("compiled", "eager"):
        engine, problem = single(execution, OPTIMIZERS["sgd_momentum"], cls=PoisonedGradient, batches=poisoned_batches(),
                                 iters=6, on_nonfinite="skip")
        engine.run()
        runs[execution] = (engine.status("fit").skipped, params(problem))
    assert runs["compiled"][0] == runs["eager"][0] == 1
    for a, b in zip(runs["eager"][1], runs["compiled"][1], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def cg_bilevel(execution):
    torch.manual_seed(0)
    net, scale = nn.Linear(3, 1), Scale()
    inner = WeightedFit("inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5),
                  data=data(rows=8), config=ProblemConfig(hypergrad="cg", unroll_steps=5, execution=execution))
    outer = Outer("outer", module=scale, optimizer=torch.optim.SGD(scale.parameters(), lr=0.05),
                  data=data(rows=8, seed=1))
    engine = Engine([outer, inner], dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
                    config=EngineConfig(train_iters=15))
    return engine.run(), inner, outer


def test_implicit_inner_loop_compiled_keeps_the_hypergradient():
    eager_engine, eager_inner, eager_outer = cg_bilevel("eager")
    engine, inner, outer = cg_bilevel("compiled")
    assert engine.status("outer").steps == 3
    for a, b in zip(params(eager_inner), params(inner), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(outer.module.scale, eager_outer.module.scale, **TOL)
    hyper, reference = engine.status("outer").gradient, eager_engine.status("outer").gradient
    assert reference["outer.scale"].abs() > 0
    torch.testing.assert_close(hyper["outer.scale"], reference["outer.scale"], **TOL)
    assert [c.path for c in engine.execution_choices("inner").values()] == ["compiled"]
    assert engine.execution_choices("outer") == {}  # the upper step takes a hypergradient: eager


def test_auto_measures_both_paths_and_keeps_the_trajectory(caplog):
    reference, ref_problem = single("eager", OPTIMIZERS["adam"], iters=AUTO_DONE)
    reference.run()
    with caplog.at_level(logging.INFO, logger="betty_like"):
        engine, problem = single("auto", OPTIMIZERS["adam"], iters=AUTO_DONE)
        engine.run()
    (choice,) = engine.execution_choices("fit").values()
    assert choice.path in ("eager", "compiled")
    assert choice.eager_ms > 0 and choice.compiled_ms > 0
    assert f"chose {choice.path}" in caplog.text
    for a, b in zip(params(ref_problem), params(problem), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_batch_shapes_beyond_the_bound_run_eager(monkeypatch, caplog):
    monkeypatch.setattr(compiled, "MAX_SHAPES", 1)
    batches = [*data(n=2), *data(n=2, rows=5, seed=3)]
    reference, ref_problem = single("eager", OPTIMIZERS["sgd_momentum"], batches=batches)
    reference.run()
    engine, problem = single("compiled", OPTIMIZERS["sgd_momentum"], batches=batches)
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        engine.run()
    paths = sorted(c.path for c in engine.execution_choices("fit").values())
    assert paths == ["compiled", "eager"]
    assert "only 1 are captured" in caplog.text
    for a, b in zip(params(ref_problem), params(problem), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_uncapturable_step_raises_for_compiled_and_falls_back_for_auto(caplog):
    engine, _ = single("compiled", OPTIMIZERS["sgd_momentum"], cls=ReadsItem, iters=3)
    with pytest.raises(RuntimeError, match=r"problem 'fit': execution='compiled' could not capture.*execution='auto'"):
        engine.run()
    reference, ref_problem = single("eager", OPTIMIZERS["sgd_momentum"], cls=ReadsItem, iters=compiled.TRIAL_STEPS + 6)
    reference.run()
    engine, problem = single("auto", OPTIMIZERS["sgd_momentum"], cls=ReadsItem, iters=compiled.TRIAL_STEPS + 6)
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        engine.run()
    (choice,) = engine.execution_choices("fit").values()
    assert choice.path == "eager" and choice.reason.startswith("capture failed")
    assert "could not capture" in caplog.text
    for a, b in zip(params(ref_problem), params(problem), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_a_step_that_changes_python_state_each_time_is_refused_clearly():
    # toy.Inner counts its calls in a Python attribute: every step would need a new graph
    torch.manual_seed(0)
    net, scale = nn.Linear(3, 1), Scale()
    inner = Inner("inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), data=data(rows=8),
                  config=ProblemConfig(hypergrad="cg", unroll_steps=20, execution="compiled"))
    outer = Outer("outer", module=scale, optimizer=torch.optim.SGD(scale.parameters(), lr=0.05),
                  data=data(rows=8, seed=1))
    engine = Engine([outer, inner], dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
                    config=EngineConfig(train_iters=20))
    with pytest.raises(RuntimeError, match=r"problem 'inner': execution='compiled' could not capture.*RecompileLimit.*attributes it changes every step"):
        engine.run()


def test_optimizer_without_pure_step_is_an_error_for_compiled_and_eager_for_auto(caplog):
    rmsprop = lambda p: torch.optim.RMSprop(p, lr=0.01)  # noqa: E731
    with pytest.raises(TypeError, match=r"problem 'fit': execution='compiled' needs a pure step.*RMSprop.*'SGD'"):
        single("compiled", rmsprop)
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        engine, _ = single("auto", rmsprop, iters=2)
    engine.run()
    assert engine.execution_choices("fit") == {}
    assert "RMSprop has no pure step" in caplog.text


def test_invalid_execution_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"ProblemConfig.execution='fast' is invalid: choose one of \['eager', 'compiled', 'auto'\]"):
        ProblemConfig(execution="fast")


def test_unrolled_and_hypergradient_steps_stay_eager_and_say_so(caplog):
    torch.manual_seed(0)
    net, scale = nn.Linear(3, 1), Scale()
    inner = Inner("inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), data=data(rows=8),
                  config=ProblemConfig(hypergrad="unroll", execution="compiled"))
    outer = Outer("outer", module=scale, optimizer=torch.optim.SGD(scale.parameters(), lr=0.05),
                  data=data(rows=8, seed=1), config=ProblemConfig(execution="compiled"))
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        engine = Engine([outer, inner], dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
                        config=EngineConfig(train_iters=2))
    engine.run()
    assert "problem 'inner': its unrolled steps keep a graph" in caplog.text
    assert "problem 'outer': execution='compiled' applies to problems that read no other solution" in caplog.text
    assert engine.execution_choices("inner") == {} and engine.execution_choices("outer") == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_follows_the_eager_trajectory():
    results = []
    for execution in ("eager", "compiled"):
        net = mlp().cuda()
        problem = Fit("fit", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                      data=[tuple(t.cuda() for t in b) for b in data()], config=ProblemConfig(execution=execution))
        Engine([problem], config=EngineConfig(train_iters=8)).run()
        results.append(params(problem))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_a_loaded_optimizer_state_is_what_the_captured_step_continues_from():
    runs = []
    for execution in ("eager", "compiled"):
        engine, problem = single(execution, OPTIMIZERS["adam"], iters=4)
        engine.run()
        saved = copy.deepcopy(problem.optimizer.state_dict())
        for entry in saved["state"].values():
            entry["exp_avg"].mul_(-3.0)  # a state that differs from the live one
        problem.optimizer.load_state_dict(saved)
        engine.run()
        runs.append((params(problem), problem.optimizer))
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert_same_state(runs[0][1], runs[1][1])


class FitWithMetrics(Fit):
    """A ``training_step`` that returns a dict: the loss and a scalar computed from the same forward."""

    def training_step(self, batch):
        x, y = batch
        residual = self.module(x).squeeze(-1) - y
        return {"loss": (residual**2).mean(), "max_abs_residual": residual.abs().max()}


def test_a_dict_result_is_a_loss_and_metrics_on_captured_steps_too():
    runs = {}
    for execution in ("eager", "compiled"):
        engine, problem = single(execution, OPTIMIZERS["sgd_momentum"], cls=FitWithMetrics)
        engine.run()
        runs[execution] = (engine, problem)
    (eager_engine, eager), (engine, captured) = runs["eager"], runs["compiled"]
    for a, b in zip(params(eager), params(captured), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    (choice,) = engine.execution_choices("fit").values()
    assert choice.path == "compiled"
    # the last step was a captured one; its metric is the number the eager run's last step computed
    expected = float(eager_engine.status("fit").metrics["max_abs_residual"])
    assert float(engine.status("fit").metrics["max_abs_residual"]) == pytest.approx(expected, rel=1e-9)
