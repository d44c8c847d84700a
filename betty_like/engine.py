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
import logging
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ._evaluations import Evaluations
from ._functional import ProblemModules
from ._guards import Where, guard, loss_value
from ._run_state import ProblemStatus, Record, Schedule, Window, random_states, restore_random_states
from ._setup import Setup, check_unchanged, set_up_all
from ._user_code import call_user, checked_loss
from .config import EngineConfig
from .execution import ExecutionChoice, plan_executions
from .graph import Graph
from .hypergrad import HypergradInfo, Level, Program, hypergradient
from .hypergrad._tree import detach
from .hypergrad.unroll import keeps_graph, window_gradient
from .optim import Params, clip_grad_norm
from .problem import Problem

log = logging.getLogger("betty_like")


@dataclass
class StepOutcome:
    """What computing one step gives the finishing step; ``commit(gradient)`` applies it."""

    loss: Tensor
    gradient: Params
    commit: Callable[[Params], None]
    infos: dict[str, HypergradInfo] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    skip: bool = False  # a non-finite hypergradient under on_nonfinite="skip"


class Engine:
    """Runs problems wired by ``dependencies`` and computes hypergradients through the levels.

    Args:
        problems: the :class:`Problem` instances, any order.
        dependencies: ``{"u2l": {upper: [lowers]}, "l2u": {lower: [uppers]}}`` with problems or
            their names, Betty's forms as written; see :mod:`betty_like.graph`.
        config: engine settings.
    """

    def __init__(
        self,
        problems: Iterable[Problem],
        dependencies: Mapping[str, Mapping[Any, Iterable[Any]]] | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        problems = list(problems)
        for p in problems:
            if not isinstance(p, Problem):
                raise TypeError(f"Engine takes Problem instances, got {type(p).__name__}: subclass betty_like.Problem")
        names = [p.name for p in problems]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"problem names must be unique, {duplicates} appear more than once")
        for p in problems:
            if p._engine is not None:
                raise ValueError(f"problem {p.name!r} already belongs to another Engine: create a new instance")
        self.config = config if config is not None else EngineConfig()
        if not isinstance(self.config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(self.config).__name__}")
        self.problems: dict[str, Problem] = {p.name: p for p in problems}
        self.graph = Graph(names, dependencies)
        self.device = torch.device(self.config.device) if self.config.device is not None else None
        self._setups: dict[str, Setup] = set_up_all(self.problems, self.graph, self.device)
        self._modules = ProblemModules({n: p.module for n, p in self.problems.items()})
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
        self._warned: set[str] = set()
        self._evaluations = Evaluations(self._modules.buffers(), self.problems)
        self._configs = {n: s.config for n, s in self._setups.items()}
        self._executions = plan_executions(self._setups, self.graph.reads, self._modules, self._warn_once)

    # ------------------------------------------------------------------ what users read
    def status(self, name: str) -> ProblemStatus:
        """A read-only view of problem ``name``: steps, last loss, last gradient, solver diagnostics."""
        if name not in self.problems:
            raise KeyError(f"unknown problem {name!r}; problems: {sorted(self.problems)}")
        return ProblemStatus.of(name, self._schedule[name], self._records[name], self._windows[name])

    def leaves(self, name: str) -> Params:
        """The real (leaf) trainable parameters of problem ``name``, keyed ``"<problem>.<param>"``."""
        return dict(self._setups[name].leaves)

    def current_params(self) -> Params:
        """Every problem's current parameters: an unrolled problem's window weights, else its leaves."""
        params: Params = {}
        for name, setup in self._setups.items():
            window = self._window(name)
            params.update(window.params if window is not None else setup.leaves)
        return params

    def execution_choices(self, name: str) -> dict[tuple, ExecutionChoice]:
        """How problem ``name``'s plain steps ran, per batch shape (empty when they all run eager)."""
        execution = self._executions.get(name)
        return dict(execution.choices) if execution is not None else {}

    def program(self, copies: bool = False) -> Program:
        """An immutable snapshot of every level for the traversal (:func:`betty_like.hypergrad.hypergradient`).

        With ``copies`` the leaves of problems without a window enter as copies (still differentiable
        to the leaves): a graph kept by an unrolled step then survives their in-place optimizer steps.
        """
        current = self.current_params()
        levels = {}
        for name, setup in self._setups.items():
            window = self._windows[name]
            if window is None:
                setup.functional.reload_state()
            levels[name] = Level(
                name,
                {k: current[k].clone() if copies and window is None else current[k] for k in setup.leaves},
                partial(self._bound_loss, name),
                setup.method,
                setup.problem.config,
                setup.functional,
                window is not None,
            )
        return Program(self.graph, levels)

    @contextlib.contextmanager
    def borrowed_batches(self) -> Iterator[None]:
        """Batches drawn inside (a problem without a current one) go back to their streams on exit."""
        had = set(self._batches)
        try:
            yield
        finally:
            for name in [n for n in self._batches if n not in had]:
                self._setups[name].stream.put_back(self._batches.pop(name))

    # ------------------------------------------------------------------ running
    def run(self, iterations: int | None = None) -> Engine:
        """Run until ``config.train_iters`` iterations are done, or ``iterations`` more; returns self.

        Seeds torch once, at the first run. After an exception or Ctrl-C, calling it again continues
        where the interrupted iteration stopped.
        """
        if iterations is not None and (not isinstance(iterations, int) or iterations < 0):
            raise ValueError(f"run(iterations={iterations!r}) is invalid: use an integer >= 0 or None")
        if self.config.seed is not None and not self._seeded:
            torch.manual_seed(self.config.seed)
            self._seeded = True
        count = max(self.config.train_iters - self.iteration, 0) if iterations is None else iterations
        for _ in range(count):
            self.step()
        self.sync()
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

    def validate(self) -> dict[str, dict[str, float]]:
        """Call every problem's optional ``validation_step()`` (no arguments, returns a dict of floats)."""
        results = {}
        for name, problem in self.problems.items():
            step = getattr(problem, "validation_step", None)
            if step is None:
                continue
            with torch.no_grad():
                metrics = call_user(name, "validation_step", self._modules, self.current_params(), step)
            if not isinstance(metrics, Mapping):
                raise TypeError(
                    f"problem {name!r}: validation_step must return a dict of metrics, got {type(metrics).__name__}"
                )
            results[name] = {k: float(v) for k, v in metrics.items()}
            self.validation_history.append({"iteration": self.iteration, "problem": name, **results[name]})
        return results

    # ------------------------------------------------------------------ waves
    def _run_wave(self, names: list[str]) -> list[list[str]]:
        """Step the due problems of ``names`` as one transaction; returns the waves their reports make due."""
        due = [n for n in names if (self._schedule[n].rounds + 1) % self.problems[n].config.step_every == 0]
        randomness, previous, drawn = random_states(), dict(self._batches), []
        try:
            if len(due) == 1 and due[0] in self._executions:
                name = due[0]
                self._draw(name, drawn)
                taken = self._executions[name].step(
                    self._batches[name],
                    lambda: self._complete(name, self._compute(name)),
                    lambda: self._complete(name, self._replayed(name)),
                )
                reports = [name] if taken and self._count(name) else []
            else:
                outcomes = {}
                for name in due:
                    self._draw(name, drawn)
                    outcomes[name] = self._compute(name)
                values = {name: self._loss_value(name, outcome.loss) for name, outcome in outcomes.items()}
                reports = [name for name in due if self._finish(name, outcomes[name], values[name]) and self._count(name)]
        except BaseException:
            for name, batch in reversed(drawn):
                self._setups[name].stream.put_back(batch)
            self._batches = previous
            restore_random_states(randomness)
            raise
        for name in names:
            self._schedule[name].rounds += 1
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

    # ------------------------------------------------------------------ the step pipeline
    def _compute(self, name: str) -> StepOutcome:
        """Loss, gradient and commit of ``name``'s next step at the current state (nothing changes yet)."""
        setup = self._setups[name]
        if setup.unrolls and self._schedule[name].steps >= setup.problem.config.warmup_steps:
            return self._unrolled(name)
        if self.graph.lowers(name):
            with self._evaluations.step():
                result = hypergradient(self.program(), name)
            outcome = StepOutcome(result.loss, detach(result.gradient), partial(self._apply, name), result.infos, result.warnings)
            return self._guarded(name, outcome)
        values = None if all(w is None for w in self._windows.values()) else self.current_params()
        loss = self._loss(name, self._batches[name], values)
        keys = list(setup.leaves)
        grads = torch.autograd.grad(loss, [setup.leaves[k] for k in keys], allow_unused=True)
        gradient = {k: g for k, g in zip(keys, grads, strict=True) if g is not None}
        return StepOutcome(loss, gradient, partial(self._apply, name))

    def _unrolled(self, name: str) -> StepOutcome:
        """A differentiable step: the next window keeps its graph to the parameters it read."""
        setup = self._setups[name]
        window = self._window(name)
        keep = keeps_graph(setup.problem.config.truncate, window.steps + 1, setup.period)
        with self._evaluations.step():
            result, origin = window_gradient(self.program(copies=keep), name, window.params, keep, setup.method.through_w)

        def commit(gradient: Params) -> None:
            params, state = setup.functional.step(origin, gradient, window.state)
            self._windows[name] = Window(params, state, window.steps + 1)
            with torch.no_grad():  # the user's module always holds the latest weights
                for key, leaf in setup.leaves.items():
                    leaf.copy_(params[key])

        return self._guarded(name, StepOutcome(result.loss, result.gradient, commit, result.infos, result.warnings))

    def _guarded(self, name: str, outcome: StepOutcome) -> StepOutcome:
        """Failed solves and a non-finite gradient (with a finite loss) are handled before anything commits."""
        where = Where(name, self._schedule[name].steps + 1, self.iteration + 1)
        outcome.skip = guard(where, outcome.loss, outcome.gradient, outcome.infos, self._configs, self._warn_once)
        return outcome

    def _replayed(self, name: str) -> StepOutcome:
        """The captured step (:mod:`betty_like.execution.compiled`); its commit is the captured update."""
        context = {k: v.detach() for w in self._windows.values() if w is not None for k, v in w.params.items()}
        loss, gradient, commit = self._executions[name].replay(self._batches[name], context)
        return StepOutcome(loss, gradient, lambda _: commit())

    def _complete(self, name: str, outcome: StepOutcome) -> bool:
        return self._finish(name, outcome, self._loss_value(name, outcome.loss))

    def _finish(self, name: str, outcome: StepOutcome, value: float | None) -> bool:
        """Clip, commit, step the scheduler, record; returns whether the step was taken (not skipped)."""
        problem, record = self.problems[name], self._records[name]
        if value is None or outcome.skip:
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
            leaf.grad = gradient[key].detach().to(leaf.dtype) if key in gradient else None
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
            setup.functional.reload_state()
            weights = {k: t.detach().clone().requires_grad_(True) for k, t in setup.leaves.items()}
            self._windows[name] = Window(weights, setup.functional.state)
        return self._windows[name]

    def _bound_loss(self, name: str, values: Params) -> Tensor:
        """``name``'s loss on its current batch (drawn now if it has none) at ``values``."""
        if name not in self._batches:
            self._batches[name] = self._setups[name].stream.next(self.iteration + 1)
        return self._evaluations.call(name, partial(self._loss, name, self._batches[name], values))

    def _loss(self, name: str, batch: Any, values: Params | None) -> Tensor:
        step = self.problems[name].training_step
        loss = call_user(name, "training_step", self._modules, values, step, batch)
        return checked_loss(name, loss, self.iteration + 1)  # the iteration in progress, 1-based

    def _loss_value(self, name: str, loss: Tensor) -> float | None:
        """The loss as a float (one host sync, shared with logging), or None if the step is to be skipped."""
        where = Where(name, self._schedule[name].steps, self.iteration + 1)
        return loss_value(where, loss, self._configs[name].on_nonfinite, self._warn_once)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)
