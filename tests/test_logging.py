"""Metrics from training_step, progress bar, CSV and TensorBoard loggers, callbacks and Problem hooks."""

import csv
import io
import math

import pytest
import torch
from toy import Inner, Outer, bilevel

from betty_like import EngineConfig, ProblemConfig
from betty_like.callbacks import Callback
from betty_like.logging import Progress


class MetricInner(Inner):
    def training_step(self, batch):
        loss = super().training_step(batch)
        self.log("half", loss.detach() / 2)
        return {"loss": loss, "double": loss.detach() * 2}


def test_dict_loss_and_self_log_record_the_steps_own_evaluation():
    engine, inner, _ = bilevel(
        ProblemConfig(hypergrad="cg", iterations=5), inner_cls=MetricInner, engine_config=EngineConfig(train_iters=3)
    )
    engine.run()
    status = engine.status("inner")
    assert set(status.metrics) == {"half", "double"}
    assert float(status.metrics["half"]) == pytest.approx(status.loss / 2, rel=1e-6)
    assert float(status.metrics["double"]) == pytest.approx(status.loss * 2, rel=1e-6)
    assert engine.status("outer").metrics == {}


def test_a_dict_without_loss_names_the_problem():
    class Bad(Inner):
        def training_step(self, batch):
            return {"accuracy": torch.tensor(1.0)}

    engine, _, _ = bilevel(inner_cls=Bad, engine_config=EngineConfig(train_iters=1))
    with pytest.raises(ValueError, match="problem 'inner': training_step returned a dict without 'loss'"):
        engine.run()


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_and_tensorboard_write_the_same_fields_every_log_every(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = EngineConfig(train_iters=6, log_every=2, logger="csv,tensorboard", log_dir=str(tmp_path), progress=False)
    engine, _, _ = bilevel(
        ProblemConfig(hypergrad="cg", iterations=5), inner_cls=MetricInner, engine_config=config
    )
    engine.run()
    table = rows(tmp_path / "metrics.csv")
    assert sorted({int(r["iteration"]) for r in table}) == [2, 4, 6]
    tags = {r["tag"] for r in table}
    for tag in [
        "inner/loss", "inner/half", "inner/double", "inner/lr", "inner/hypergrad_norm", "outer/loss",
        "outer/hypergrad_norm", "outer/inner/solver_iterations", "outer/inner/solver_residual", "outer/lr",
        "time/step_s", "memory/peak_mb",
    ]:
        assert tag in tags, tag
    last = {r["tag"]: float(r["value"]) for r in table if r["iteration"] == "6"}
    assert last["inner/loss"] == engine.status("inner").loss
    assert last["outer/inner/solver_iterations"] == engine.status("outer").diagnostics["inner"].solve.iterations
    grad = engine.status("outer").gradient
    assert last["outer/hypergrad_norm"] == pytest.approx(math.sqrt(sum(float(g.pow(2).sum()) for g in grad.values())))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == tags
    assert [e.step for e in events.Scalars("inner/loss")] == [2, 4, 6]
    assert events.Scalars("inner/loss")[-1].value == pytest.approx(last["inner/loss"])


def test_logger_none_writes_nothing(tmp_path):
    engine, _, _ = bilevel(engine_config=EngineConfig(train_iters=3, log_every=1, log_dir=str(tmp_path / "x")))
    engine.run()
    assert not (tmp_path / "x").exists()


def test_a_logger_needs_a_directory_and_a_known_name():
    with pytest.raises(ValueError, match="EngineConfig.log_dir=None is invalid"):
        EngineConfig(logger="csv")
    with pytest.raises(ValueError, match="EngineConfig.logger='wandb' is invalid: use 'none' or a comma-separated list"):
        EngineConfig(logger="wandb", log_dir=".")


def test_progress_bar_shows_losses_when_forced_and_is_off_on_a_pipe(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    engine, _, _ = bilevel(engine_config=EngineConfig(train_iters=3, progress=True))
    engine.run()
    text = stream.getvalue()
    assert "3/3" in text and "inner=" in text and "outer=" in text and "it/s" in text
    stream.truncate(0)
    engine, _, _ = bilevel(engine_config=EngineConfig(train_iters=3))  # None: terminal only; StringIO is not one
    engine.run()
    assert stream.getvalue() == ""
    assert not any(isinstance(c, Progress) for c in bilevel(engine_config=EngineConfig(progress=False))[0].callbacks.items)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_run_start(self, engine):
        self.calls.append(("run_start", engine.iteration))

    def on_step_start(self, engine, name):
        self.calls.append(("step_start", name, engine.status(name).steps))

    def on_step_end(self, engine, name):
        self.calls.append(("step_end", name, engine.status(name).steps))

    def on_iteration_end(self, engine):
        self.calls.append(("iteration", engine.iteration))

    def on_validation_end(self, engine, results):
        self.calls.append(("validation", engine.iteration, sorted(results)))

    def on_run_end(self, engine):
        self.calls.append(("run_end", engine.iteration))


class Validated(Outer):
    def validation_step(self):
        return {"scale": self.module.scale.detach()}


def test_callbacks_are_called_in_order_at_their_points():
    from toy import Scale, batches

    from betty_like import Engine

    recorder = Recorder()
    net, scale = torch.nn.Linear(3, 1), Scale()
    inner = Inner("inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), data=batches(),
                  config=ProblemConfig(unroll_steps=2))
    outer = Validated("outer", module=scale, optimizer=torch.optim.SGD(scale.parameters(), lr=0.01), data=batches(seed=1))
    engine = Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
                    EngineConfig(train_iters=2, valid_every=2), callbacks=[recorder])
    engine.run()
    assert recorder.calls == [
        ("run_start", 0),
        ("step_start", "inner", 0), ("step_end", "inner", 1), ("iteration", 1),
        ("step_start", "inner", 1), ("step_end", "inner", 2),
        ("step_start", "outer", 0), ("step_end", "outer", 1),
        ("validation", 2, ["outer"]), ("iteration", 2),
        ("run_end", 2),
    ]


def test_a_callback_error_names_the_callback_and_hook():
    class Broken(Callback):
        def on_iteration_end(self, engine):
            raise RuntimeError("boom")

    engine, _, _ = bilevel()
    engine.callbacks.items.insert(0, Broken())
    with pytest.raises(RuntimeError, match="boom") as info:
        engine.run()
    assert "(raised in Broken.on_iteration_end)" in info.value.__notes__


def test_forward_override_is_what_calling_a_problem_runs_and_parameters_are_the_trainable_ones():
    class Doubled(Inner):
        def forward(self, x):
            return 2 * self.module(x)

    engine, inner, outer = bilevel(inner_cls=Doubled)
    x = torch.randn(4, 3)
    assert torch.equal(inner(x), 2 * inner.module(x))
    assert [id(p) for p in inner.parameters()] == [id(p) for p in inner.module.parameters()]
    assert [id(p) for p in outer.parameters()] == [id(outer.module.scale)]


def test_parameters_inside_training_step_are_the_current_values_so_regularizers_differentiate():
    class Regularized(Inner):
        def __init__(self, *args, explicit=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.explicit = explicit

        def training_step(self, batch):
            params = [self.module.weight, self.module.bias] if self.explicit else self.parameters()
            return super().training_step(batch) + 0.1 * sum(p.pow(2).sum() for p in params)

    results = []
    for explicit in (False, True):
        torch.manual_seed(0)
        engine, _, outer = bilevel(ProblemConfig(hypergrad="unroll", unroll_steps=2), inner_cls=Regularized)
        engine.problems["inner"].explicit = explicit
        engine.run()
        results.append(outer.module.scale.detach().clone())
    assert torch.equal(results[0], results[1])
