"""``Engine``: the schedule of a multilevel program, one step pipeline, and the state that changes.

The schedule is leaf-first: every iteration steps each problem that reads no other solution. After
``unroll_steps`` counted steps a problem reports to the problems that read it; a problem is due
once all it reads have reported, and steps on every ``step_every``-th time it is due. Problems made
due by the same reports form a *wave*: all of them compute their gradients at the same state, then
all commit. A wave is a transaction: if user code raises (or Ctrl-C lands) before its commits, its
batches and random states are put back and nothing counts, so ``run()`` again continues exactly
where it stopped.

Every step, whatever its kind, returns a :class:`StepOutcome` (loss, gradient, commit) to one
finishing step: the non-finite policy, clipping, the commit (the user's optimizer, or the next
unrolled window), the scheduler and the record. Gradients of problems that read lower solutions
come from the traversal in :mod:`betty_like.hypergrad`, handed an immutable :class:`Program`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ._audit import LossAudit
from ._data import borrowed, split_batch
from ._evaluations import Evaluations
from ._functional import ProblemModules
from ._guards import WarnOnce, Where, guard, loss_value
from ._run_state import ProblemStatus, Record, Schedule, Window, random_states, restore_random_states, seeded
from ._setup import check_problems, check_unchanged, set_up_all
from ._snapshot import snapshot
from ._user_code import call_user, checked_loss, split_loss, validation_metrics
from .callbacks import Callback, Callbacks
from .checkpoint import checkpoint_policies
from .config import EngineConfig
from .distributed import DataParallel
from .execution import ExecutionChoice, plan_executions, plan_hvps
from .graph import Graph
from .hypergrad import HypergradInfo, Program, hypergradient
from .hypergrad._tree import aliases, detach
from .hypergrad.unroll_memory import WindowStep, keeps_graph, rematerialized, window_gradient
from .logging import Metrics, log_policies
from .optim import Params, clip_grad_norm
from .precision import Precision, device_type
from .problem import Problem


@dataclass
class StepOutcome:
    """What computing one step gives the finishing step; ``commit(gradient)`` applies it."""

    loss: Tensor
    gradient: Params
    commit: Callable[[Params], None]
    infos: dict[str, HypergradInfo] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    skip: bool = False  # a non-finite hypergradient under on_nonfinite="skip"
    value: float = float("nan")  # the loss as a float, read with the gradient's finiteness check
    summary: Tensor | None = None  # the loss and gradient norms, where the step computed them (a captured step)


class Engine:
    """Runs problems wired by ``dependencies`` and computes hypergradients through the levels.

    Args:
        problems: the :class:`Problem` instances, any order.
        dependencies: ``{"u2l": {upper: [lowers]}, "l2u": {lower: [uppers]}}`` with problems or
            their names, Betty's forms as written; see :mod:`betty_like.graph`.
        config: engine settings.
        callbacks: :class:`~betty_like.callbacks.Callback` hooks, called before the policies ``config`` chooses.
    """

    def __init__(
        self,
        problems: Iterable[Problem],
        dependencies: Mapping[str, Mapping[Any, Iterable[Any]]] | None = None,
        config: EngineConfig | None = None,
        callbacks: Iterable[Callback] = (),
    ) -> None:
        problems = check_problems(problems)
        names = [p.name for p in problems]
        self.config = config if config is not None else EngineConfig()
        if not isinstance(self.config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(self.config).__name__}")
        self.problems: dict[str, Problem] = {p.name: p for p in problems}
        self.graph = Graph(names, dependencies)
        self.device = torch.device(self.config.device) if self.config.device is not None else None
        self._dist = DataParallel(self.config.distributed, self.device)
        shard = self._dist.shard if self._dist.active else None
        self._setups = set_up_all(self.problems, self.graph, self.device, shard)
        self._modules = ProblemModules({n: p.module for n, p in self.problems.items()})
        self._dist.broadcast(p.module for p in problems)
        kind = device_type(self.device, [p.module for p in problems])
        self._precision = Precision(self.config.precision, kind, self.config.loss_scale)
        lean = {n: p.config.unroll_memory for n, p in self.problems.items() if p.config.unroll_memory != "graph"}
        if lean and (self._dist.active or self.config.precision == "fp16"):  # docs/distributed.md: why
            modes = "/".join(repr(m) for m in sorted(set(lean.values())))
            raise ValueError(f"problems {sorted(lean)}: unroll_memory={modes} replays each step in the backward pass without the fp16 loss scaler or the data-parallel all-reduce of its gradient, so the replay would not be the step taken; use unroll_memory='graph' here")
        for p in problems:
            p._engine = self
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.validation_history: list[dict[str, Any]] = []
        self._schedule = {n: Schedule() for n in names}
        self._records = {n: Record() for n in names}
        self._windows: dict[str, Window | None] = {n: None for n in names}
        self._batches: dict[str, Any] = {}
        self._pending: deque[list[str]] = deque()
        self._seeded = False
        self._warn_once = WarnOnce()
        self.metrics, policies = Metrics(), [*log_policies(self.config), *checkpoint_policies(self.config)]
        self.callbacks = Callbacks([*callbacks, *policies])
        self._evaluations = Evaluations(self._modules.buffers(), self.problems)
        self._configs = {n: s.config for n, s in self._setups.items()}
        self._audit = LossAudit(self.graph, self._setups, self._warn_once)
        self._executions = plan_executions(self._setups, self.graph.reads, self._modules, self._warn_once, self.metrics.record, self.config.precision, self._dist.active)
        self._hvps = plan_hvps(self._setups, self._modules, lambda n: self._batches[n], self._warn_once)

    def status(self, name: str) -> ProblemStatus:
        """A read-only view of problem ``name``: steps, last loss, last gradient, solver diagnostics."""
        if name not in self.problems:
            raise KeyError(f"unknown problem {name!r}; problems: {sorted(self.problems)}")
        return ProblemStatus.of(name, self._schedule[name], self._records[name], self._windows[name])

    def current_params(self) -> Params:
        """Every problem's current parameters: an unrolled problem's window weights, else its leaves."""
        params: Params = {}
        for name, setup in self._setups.items():
            window = self._window(name)
            params.update(window.params if window is not None else setup.leaves)
        return params

    def execution_choices(self, name: str) -> dict[tuple, ExecutionChoice]:
        """How problem ``name``'s plain steps ran, per batch shape (empty when they all run eager)."""
        return dict(self._executions[name].choices) if name in self._executions else {}

    def program(self, copies: bool = False, scaled: str | None = None, bind_batches: bool = False) -> Program:
        """An immutable snapshot of every level for the traversal (:func:`betty_like.hypergrad.hypergradient`).

        ``copies``: see :func:`~betty_like._snapshot.snapshot`. ``scaled`` names the problem whose loss enters multiplied by the fp16 loss scale.
        With ``bind_batches`` each loss keeps the batch its problem holds now (a step replayed later must see the same data).
        """
        scale, batch = self._precision.scale, (lambda n: self._batches.get(n) if bind_batches else None)
        open_windows = {n for n, w in self._windows.items() if w is not None}
        return snapshot(
            self.graph, self._setups, open_windows, self.current_params(),
            lambda n, split=False: partial(self._bound_loss, n, scale if n == scaled else 1.0, batch=batch(n), split=split),
            lambda n: (self._dist.push_wrap(self._precision.push_wrap(self._setups[n].problem.config)),
                       self._dist.matvec_wrap(self._precision.matvec_wrap()), self._dist.mean),
            copies, self._hvps, self._dist.world,
        )

    @contextlib.contextmanager
    def borrowed_batches(self) -> Iterator[None]:
        """Batches drawn inside (a problem without a current one) go back to their streams on exit."""
        with borrowed(self._batches, {n: s.stream for n, s in self._setups.items()}):
            yield

    def run(self, iterations: int | None = None) -> Engine:
        """Run until ``config.train_iters`` iterations are done, or ``iterations`` more; returns self.

        Seeds torch once, at the first run; ``config.resume`` loads a checkpoint at its start. After
        an exception or Ctrl-C, calling it again continues where the interrupted iteration stopped.
        """
        if iterations is not None and (not isinstance(iterations, int) or iterations < 0):
            raise ValueError(f"run(iterations={iterations!r}) is invalid: use an integer >= 0 or None")
        self._seeded = self._seeded or seeded(self.config.seed)
        self.callbacks.call("on_run_start", self)
        try:
            count = max(self.config.train_iters - self.iteration, 0) if iterations is None else iterations
            for _ in range(count):
                self.step()
            self.sync()
        finally:
            self.callbacks.call("on_run_end", self)
        return self

    def sync(self) -> None:
        """Store every open window's optimizer state in the user's optimizer (the weights always are)."""
        for name, window in self._windows.items():
            if window is not None:
                self._setups[name].functional.write_back(window.state)

    def step(self) -> None:
        """One iteration: every leaf problem steps once, and whatever becomes due steps after it."""
        check_unchanged(self._setups)
        if not self._pending:
            self._pending.extend([leaf] for leaf in self.graph.leaves())
        while self._pending:
            followers = self._run_wave(self._pending[0])
            self._pending.popleft()
            self._pending.extendleft(reversed(followers))
        self.iteration += 1
        if self.iteration % self.config.log_every == 0:
            for name, record in self._records.items():
                if record.loss is not None:
                    self.history.append({"iteration": self.iteration, "problem": name, "loss": record.loss})
        if self.config.valid_every and self.iteration % self.config.valid_every == 0:
            self.validate()
        self.callbacks.call("on_iteration_end", self)

    def validate(self) -> dict[str, dict[str, float]]:
        """Call every problem's optional ``validation_step()`` (no arguments, returns a dict of floats)."""
        results = validation_metrics(self.problems, self._modules, self.current_params())
        for name, metrics in results.items():
            self.validation_history.append({"iteration": self.iteration, "problem": name, **metrics})
        self.callbacks.call("on_validation_end", self, results)
        return results

    def _run_wave(self, names: list[str]) -> list[list[str]]:
        """Step the due problems of ``names`` as one transaction; returns the waves their reports make due."""
        due = [n for n in names if (self._schedule[n].rounds + 1) % self.problems[n].config.step_every == 0]
        randomness, previous, drawn = random_states(), dict(self._batches), []
        try:
            for name in due:
                self.metrics.begin(name)
                self.callbacks.call("on_step_start", self, name)
            if len(due) == 1 and due[0] in self._executions:
                name = due[0]
                self._draw(name, drawn)
                taken = self._executions[name].step(
                    self._batches[name],
                    lambda: self._finish(name, o := self._compute(name), self._loss_value(name, o)),
                    lambda: self._finish(name, o := self._replayed(name), self._loss_value(name, o)),
                )
                reports = [name] if taken and self._count(name) else []
            else:
                outcomes = {}
                for name in due:
                    self._draw(name, drawn)
                    outcomes[name] = self._compute(name)
                values = {name: self._loss_value(name, outcome) for name, outcome in outcomes.items()}
                reports = [name for name in due if self._finish(name, outcomes[name], values[name]) and self._count(name)]
        except BaseException:
            for name, batch in reversed(drawn):
                self._setups[name].stream.put_back(batch)
            self._batches = previous
            restore_random_states(randomness)
            raise
        for name in names:
            self._schedule[name].rounds += 1
        for name in due:
            self.callbacks.call("on_step_end", self, name)
        due_readers = []
        for name in reports:
            for reader in self.graph.readers(name):
                schedule = self._schedule[reader]
                schedule.ready.add(name)
                if schedule.ready >= set(self.graph.reads(reader)) and reader not in due_readers:
                    schedule.ready.clear()
                    due_readers.append(reader)
        return [due_readers] if due_readers else []

    def _draw(self, name: str, drawn: list[tuple[str, Any]]) -> None:
        batch = self._setups[name].stream.next(self.iteration + 1)
        drawn.append((name, batch))
        self._batches[name] = batch

    def _compute(self, name: str) -> StepOutcome:
        """Loss, gradient and commit of ``name``'s next step at the current state (nothing changes yet)."""
        setup = self._setups[name]
        if setup.unrolls and self._schedule[name].steps >= setup.problem.config.warmup_steps:
            return self._unrolled(name)
        with self._precision.forward():
            if self.graph.lowers(name):
                with self._evaluations.step():
                    result = hypergradient(self.program(scaled=name), name)
                loss, gradient = self._global(result.loss.detach(), detach(result.gradient))
                return self._guarded(name, StepOutcome(loss, gradient, partial(self._apply, name), result.infos, result.warnings))
            values = None if all(w is None for w in self._windows.values()) else self.current_params()
            loss = self._bound_loss(name, self._precision.scale, values)
            grads = torch.autograd.grad(loss, list(setup.leaves.values()), allow_unused=True)
        loss, gradient = self._global(loss.detach(), {k: g for k, g in zip(setup.leaves, grads, strict=True) if g is not None})
        return self._guarded(name, StepOutcome(loss, gradient, partial(self._apply, name)))

    def _global(self, loss: Tensor, gradient: Params) -> tuple[Tensor, Params]:
        """A step's loss and gradient unscaled (fp16) and summed over ranks (data parallel)."""
        return self._dist.reduce(*self._precision.unscale(loss, gradient))

    def _unrolled(self, name: str) -> StepOutcome:
        """A differentiable step: the next window keeps its graph (or, rematerialized, its inputs) to what it read."""
        setup, config = self._setups[name], self.problems[name].config
        window = self._window(name)
        keep = keeps_graph(config.truncate, window.steps + 1, setup.period)
        remat = keep and config.unroll_memory != "graph"
        with self._precision.forward(config, second_order=keep), self._evaluations.step():
            program = self.program(copies=keep, scaled=name, bind_batches=remat)
            if remat:
                step = WindowStep(program, name, window.params, window.state, setup.functional, config, setup.method.through_w, self._modules)
                result, params, state = rematerialized(step)
                commit = partial(self._advance_window, name, lambda _: (params, state))
            else:
                result, origin = window_gradient(program, name, window.params, keep, setup.method.through_w)
                commit = partial(self._advance_window, name, lambda g: setup.functional.step(origin, g, window.state))
        result.loss, result.gradient = self._global(result.loss.detach(), result.gradient)
        return self._guarded(name, StepOutcome(result.loss, result.gradient, commit, result.infos, result.warnings))

    def _guarded(self, name: str, outcome: StepOutcome) -> StepOutcome:
        """Failed solves and a non-finite gradient (with a finite loss) are handled before anything commits."""
        where, scaled = Where(name, self._schedule[name].steps + 1, self.iteration + 1), self._precision.scaler is not None
        outcome.skip, outcome.value = guard(where, outcome.loss, outcome.gradient, outcome.infos, self._configs, self._warn_once, scaled, outcome.summary)
        return outcome

    def _advance_window(self, name: str, step: Callable[[Params], tuple[Params, Any]], gradient: Params) -> None:
        """Commit of an unrolled step: the next window, mirrored into the user's module."""
        self._windows[name] = self._windows[name].advanced(*step(gradient), mirror=self._setups[name].leaves)

    def _replayed(self, name: str) -> StepOutcome:
        """The captured step (:mod:`betty_like.execution.compiled`); its commit is the captured update."""
        context = {k: v.detach() for w in self._windows.values() if w is not None for k, v in w.params.items()}
        loss, gradient, commit, summary = self._executions[name].replay(self._batches[name], context)
        return self._guarded(name, StepOutcome(loss, gradient, lambda _: commit(), summary=summary))

    def _finish(self, name: str, outcome: StepOutcome, value: float | None) -> bool:
        """Clip, commit, step the scheduler, record; returns whether the step was taken (not skipped)."""
        problem, record = self.problems[name], self._records[name]
        if value is None or outcome.skip or not self._precision.accept(name, outcome.gradient):
            record.skipped += 1
            if outcome.skip:  # the windows it read are spent: they reopen from the weights, never grow
                self._consume(name)
            return False
        clip = problem.config.grad_clip
        outcome.commit(clip_grad_norm(outcome.gradient, clip) if clip is not None else outcome.gradient)
        if problem.scheduler is not None:
            with warnings.catch_warnings():
                # an unrolled step updates functionally, so torch's "optimizer.step() was never called" check misfires
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                problem.scheduler.step()
        record.loss, record.gradient, record.infos = value, detach(outcome.gradient), outcome.infos
        record.metrics = self.metrics.take(name)
        for message in outcome.warnings:
            self._warn_once(message, message)
        return True

    def _count(self, name: str) -> bool:
        """Count a taken step; returns whether ``name`` now reports to its readers (not warm-up, every ``unroll_steps``)."""
        config, schedule = self.problems[name].config, self._schedule[name]
        schedule.steps += 1
        if schedule.steps <= config.warmup_steps:
            return False
        schedule.since_report += 1
        if schedule.since_report < config.unroll_steps:
            return False
        schedule.since_report = 0
        return True

    def _apply(self, name: str, gradient: Params) -> None:
        """A real step of the user's optimizer; it consumes the windows its hypergradient went through."""
        setup = self._setups[name]
        for key, leaf in setup.leaves.items():
            plain = (grad := gradient.get(key)) is None or (grad.dtype == leaf.dtype and not grad.requires_grad)
            leaf.grad = grad if plain else grad.detach().to(leaf.dtype)
        setup.problem.optimizer.step()
        self._consume(name)

    def _consume(self, name: str) -> None:
        """Close the unrolled windows ``name``'s hypergradient went through (their state goes to the user's optimizer)."""
        for dependent in self.graph.consumed(name):
            window = self._windows[dependent]
            if window is not None:
                self._setups[dependent].functional.write_back(window.state)
                self._windows[dependent] = None

    def _window(self, name: str) -> Window | None:
        """``name``'s open window, opened from its weights if it unrolls past its warm-up."""
        setup = self._setups[name]
        past_warmup = self._schedule[name].steps >= setup.problem.config.warmup_steps
        if self._windows[name] is None and setup.unrolls and past_warmup:
            self._windows[name] = Window.opened(setup.leaves, setup.functional)
        return self._windows[name]

    def _bound_loss(self, name: str, loss_scale: float, values: Params | None, batch: Any = None, split: bool = False) -> Any:
        """``name``'s loss on ``batch`` (default: its current one, drawn now if none) at ``values``, scaled; ``split``: its output_loss."""
        if batch is None and name not in self._batches:
            self._batches[name] = self._setups[name].stream.next(self.iteration + 1)
        batch, factor = self._batches[name] if batch is None else batch, loss_scale * self._setups[name].stream.share  # share: this rank's part
        if split:  # ProblemConfig refuses accumulate_steps > 1 with what splits the loss (Gauss-Newton, kfac)
            return self._evaluations.call(name, partial(split_loss, self.problems[name], self._modules, values, batch, factor))
        return self._evaluations.call(name, partial(self._accumulated, name, batch, values, factor))

    def _accumulated(self, name: str, batch: Any, values: Params | None, factor: float) -> Tensor:
        """The loss of ``batch`` at ``values`` (default: the current parameters) times ``factor``, as the
        sum over ``accumulate_steps`` shards of each shard's loss times its share.

        Every derivative of it reaches ``values`` summed over the shards of each evaluation first, which
        is what data parallel computes: there each rank's loss reads its parameters through
        :meth:`DataParallel.averaged`, whose backward averages the derivative over ranks at once, and one
        process with ``accumulate_steps=n`` gives each shard its own alias (a view) of one view in common
        of each parameter, where the shards' terms meet. The shards and shares are those of data parallel
        over as many ranks (:func:`split_batch`), so ``n`` micro-batches and ``n`` ranks give the same
        numbers (bit for bit with two). With one shard it is the loss of the batch times ``factor``.
        """
        parts = self.problems[name].config.accumulate_steps
        if parts == 1 and not self._dist.active:
            loss = self._loss(name, batch, values)
            return loss if factor == 1.0 else loss * factor
        values = self.current_params() if values is None else values
        common = self._dist.averaged(values) if self._dist.active else aliases(values)  # where the shards' terms meet
        if parts == 1:
            return self._loss(name, batch, common) * factor
        total = None
        for shard, share in split_batch(batch, parts):
            loss = self._loss(name, shard, aliases(common)) * (factor * share)
            total = loss if total is None else total + loss
        return total

    def _loss(self, name: str, batch: Any, values: Params | None) -> Tensor:
        step = self.problems[name].training_step
        with self.metrics.evaluating(name) as capturing, self._audit.call(name, values) as audited:
            out = call_user(name, "training_step", self._modules, values, step, batch)
            return audited(checked_loss(name, self.metrics.split(name, out, capturing), self.iteration + 1))

    def _loss_value(self, name: str, outcome: StepOutcome) -> float | None:
        """The loss as a float (read by the guard, shared with logging), or None if the step is to be skipped."""
        return loss_value(Where(name, self._schedule[name].steps, self.iteration + 1), outcome.value, self._configs[name].on_nonfinite, self._warn_once)
