"""Low-overhead execution of a problem's plain steps: capture the whole step once, replay it.

With small models at small batches the framework, not the arithmetic, is the cost of a step: every
operator of the forward, backward and update passes through Python and the dispatcher. A problem with
``ProblemConfig(execution="compiled")`` runs its plain (first-order) steps as one captured graph per
batch shape (:class:`~betty_like.execution._compiled_step.CapturedStep`); ``execution="auto"`` times
eager and captured steps on the first steps of each batch shape and keeps the faster.

What stays eager, and why:

- the first step of a problem: the user's optimizer creates its state there, in its own format;
- steps that take a hypergradient (a problem that reads lower solutions) and unrolled steps, which
  keep a graph for the hypergradient: PyTorch cannot differentiate a compiled graph a second time;
- batch shapes beyond the first :data:`MAX_SHAPES`: each shape is a static graph (measured faster
  than one dynamic graph: 0.51 vs 0.83 ms at batch 1, 7.3 vs 9.4 ms at batch 64 on the GPT-like
  model), so their number is bounded. Each of these is logged once.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._functional import ProblemModules
from ..optim import FunctionalOptimizer, Params, has_pure_step, supported_optimizers
from ._compiled_step import CapturedStep

log = logging.getLogger("betty_like")

MAX_SHAPES = 4  # captured batch shapes per problem; further shapes run eager
TRIAL_STEPS = 10  # timed steps of each path per batch shape under execution="auto"


@dataclass
class ExecutionChoice:
    """How a problem's plain steps run for one batch shape, and the measurements behind the choice.

    Attributes:
        shape: the batch's structure: the shape and dtype of every tensor in it.
        path: ``"eager"`` or ``"compiled"``; ``"trial"`` while ``auto`` is still measuring.
        reason: why this path was taken.
        eager_ms / compiled_ms: median step times measured by ``auto`` (``None`` if not measured).
        compile_s: seconds the first captured step took, compilation included.
    """

    shape: tuple
    path: str
    reason: str
    eager_ms: float | None = None
    compiled_ms: float | None = None
    compile_s: float | None = None
    _eager: list[float] = field(default_factory=list, repr=False)
    _compiled: list[float] = field(default_factory=list, repr=False)
    _replays: int = field(default=0, repr=False)


class CaptureFailure(RuntimeError):
    """The captured step itself failed (its cause says how), as opposed to the engine's checks of its result.

    Only this falls back to eager (``auto``) or is reported as a capture failure (``compiled``): a
    non-finite loss or gradient of a replayed step raises the same error as an eager step would.
    """


def batch_shape(batch: Any) -> tuple:
    """A hashable key of a batch's structure: what a static captured graph is specialised to."""
    if torch.is_tensor(batch):
        return (tuple(batch.shape), batch.dtype, batch.device.type)
    if isinstance(batch, (list, tuple)):
        return (type(batch).__name__, *(batch_shape(b) for b in batch))
    if isinstance(batch, Mapping):
        return ("dict", *((k, batch_shape(v)) for k, v in batch.items()))
    return (type(batch).__name__,)


class StepExecution:
    """Chooses, per batch shape, whether a problem's plain step runs eager or captured, and runs it.

    The engine hands :meth:`step` two callables: ``eager()`` takes the ordinary step through the
    user's optimizer, ``replay()`` takes the captured one (see :meth:`replay`); both return whether
    the step counted. ``capture()`` builds the :class:`CapturedStep` once the first eager step is done.
    """

    def __init__(
        self,
        owner: str,
        execution: str,
        functional: FunctionalOptimizer,
        capture: Callable[[], CapturedStep],
        warn_once: Callable[[str, str], None],
        record: Callable[[str, Mapping[str, Any]], None],
    ) -> None:
        self.owner = owner
        self._record = record  # the engine's metrics: a dict-returning training_step's scalars on captured steps
        self.execution = execution
        self._make = capture
        self.functional = functional
        self.choices: dict[tuple, ExecutionChoice] = {}
        self._captured: CapturedStep | None = None
        self._warn_once = warn_once  # the engine's: each message once per engine

    def step(self, batch: Any, eager: Callable[[], bool], replay: Callable[[], bool]) -> bool:
        """One plain step of the problem on ``batch``, eager or captured as chosen for its shape."""
        optimizer = self.functional.optimizer
        if self._captured is None or self._captured.optimizer_state is not optimizer.state:
            done = eager()  # creates the optimizer's state (or re-reads a loaded one) in torch's format
            reached = any(p.grad is not None for g in optimizer.param_groups for p in g["params"])
            if done and reached:  # a loss that reaches no parameter has nothing to capture: it stays eager
                self._captured = self._make()
                optimizer.zero_grad(set_to_none=True)  # captured steps leave .grad alone: no stale gradients
            return done
        key = batch_shape(batch)
        choice = self.choices.get(key) or self._new_choice(key)
        if choice.path == "eager":
            return eager()
        if choice.path == "trial" and len(choice._eager) < TRIAL_STEPS:
            return self._timed(choice._eager, eager)
        try:
            if choice.path == "compiled" and choice._replays:
                return replay()
            return self._first_replays(choice, replay)
        except CaptureFailure as failure:  # the engine's checks of a replayed step's result propagate as they are
            self._capture_failed(choice, failure.__cause__ or failure)
            return eager()  # nothing was written: take this step the ordinary way

    def replay(self, batch: Any, context: Params) -> tuple[Tensor, Params, Callable[[], None], Tensor]:
        """The captured step on ``batch``: ``(loss, gradients, commit, summary)``; ``context`` substitutes others'
        parameters; ``summary`` holds the loss and gradient norms the non-finite check reads."""
        captured = self._captured
        if captured is None:
            raise RuntimeError(f"problem {self.owner!r}: replay before the first eager step (engine bug)")
        captured.refresh(self.functional)
        try:
            loss, gradient, commit, metrics, summary = captured(batch, context)
        except Exception as error:  # dynamo, the backend compiler, a recompile limit
            raise CaptureFailure(f"problem {self.owner!r}: its captured step failed") from error
        self._record(self.owner, metrics)
        return loss, gradient, commit, summary

    def _new_choice(self, key: tuple) -> ExecutionChoice:
        if len(self.choices) >= MAX_SHAPES:
            choice = ExecutionChoice(key, "eager", f"more than {MAX_SHAPES} batch shapes: further shapes run eager")
            self._warn_once(
                f"shapes:{self.owner}",
                f"problem {self.owner!r}: batch shape {key} is the {len(self.choices) + 1}th; only {MAX_SHAPES} "
                "are captured, so its steps run eager. Keep batch shapes fixed (e.g. drop_last=True) to avoid this.",
            )
        elif self.execution == "auto":
            choice = ExecutionChoice(key, "trial", "measuring")
        else:
            choice = ExecutionChoice(key, "compiled", "execution='compiled'")
        self.choices[key] = choice
        return choice

    def _first_replays(self, choice: ExecutionChoice, replay: Callable[[], bool]) -> bool:
        """The compile-and-run step of a shape, a warm-up, then (under auto) timed replays and the decision."""
        choice._replays += 1
        if choice._replays == 1:
            start = time.perf_counter()
            done = replay()
            choice.compile_s = time.perf_counter() - start
            return done
        if choice._replays == 2:  # warm-up after compilation, not timed
            return replay()
        done = self._timed(choice._compiled, replay)
        if len(choice._compiled) == TRIAL_STEPS:
            self._decide(choice)
        return done

    def _capture_failed(self, choice: ExecutionChoice, error: Exception) -> None:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if self.execution == "compiled":
            raise RuntimeError(
                f"problem {self.owner!r}: execution='compiled' could not capture its step for batch shape "
                f"{choice.shape}: {type(error).__name__}: {message}. Make training_step capturable (no .item(), "
                "print(), Python branches on tensor values or Python attributes it changes every step), or use execution='auto' (falls back to eager) "
                "or execution='eager'."
            ) from error
        choice.path, choice.reason = "eager", f"capture failed: {type(error).__name__}: {message}"
        self._warn_once(
            f"capture:{self.owner}:{choice.shape}",
            f"problem {self.owner!r}: execution='auto' could not capture its step ({type(error).__name__}: "
            f"{message}); it runs eager",
        )

    def _decide(self, choice: ExecutionChoice) -> None:
        choice.eager_ms = statistics.median(choice._eager) * 1e3
        choice.compiled_ms = statistics.median(choice._compiled) * 1e3
        faster = choice.compiled_ms < choice.eager_ms
        choice.path = "compiled" if faster else "eager"
        choice.reason = f"auto: eager {choice.eager_ms:.3f} ms, compiled {choice.compiled_ms:.3f} ms per step"
        log.info(
            "problem %r: execution='auto' chose %s for batch shape %s (%s; compile %.1f s)",
            self.owner,
            choice.path,
            choice.shape,
            choice.reason,
            choice.compile_s or 0.0,
        )

    @staticmethod
    def _timed(times: list[float], run: Callable[[], bool]) -> bool:
        start = time.perf_counter()
        done = run()
        times.append(time.perf_counter() - start)
        return done


def plan_executions(
    states: Mapping[str, Any],
    lowers: Callable[[str], list[str]],
    modules: ProblemModules,
    warn_once: Callable[[str, str], None],
    record: Callable[[str, Mapping[str, Any]], None],
    precision: str = "fp32",
    distributed: bool = False,
) -> dict[str, StepExecution]:
    """A :class:`StepExecution` for every problem whose config asks for one and that has plain steps.

    ``states`` are the engine's per-problem set-ups (problem, leaves, functional optimizer, whether it
    unrolls); ``lowers(name)`` lists the problems ``name`` reads (a problem that reads none steps alone);
    ``record(name, metrics)`` takes the scalars of a captured step's dict result. Raises ``TypeError`` for
    ``execution="compiled"`` with an optimizer that has no pure step, and ``ValueError`` for it under
    ``precision`` other than fp32 or ``distributed`` (see :func:`eager_only`).
    """
    executions: dict[str, StepExecution] = {}
    blocker = eager_only(precision, distributed)
    for name, state in states.items():
        problem = state.problem
        execution = problem.config.execution
        if execution == "eager" or (blocker is not None and _refused(name, execution, blocker, warn_once)):
            continue
        if lowers(name):
            warn_once(
                f"execution:{name}",
                f"problem {name!r}: execution={execution!r} applies to problems that read no other solution; its steps "
                "wait for the problems it reads (and may take a hypergradient, which PyTorch cannot differentiate "
                "through compiled code), so they run eager",
            )
            continue
        if state.unrolls:
            warn_once(
                f"execution:{name}",
                f"problem {name!r}: its unrolled steps keep a graph for the hypergradient, which PyTorch cannot "
                f"differentiate through compiled code; they run eager (execution={execution!r} applies to its "
                "warm-up steps only)",
            )
            if problem.config.warmup_steps == 0:
                continue
        if not has_pure_step(problem.optimizer):
            if execution == "compiled":
                raise TypeError(
                    f"problem {name!r}: execution='compiled' needs a pure step for its optimizer, and "
                    f"{type(problem.optimizer).__name__} has none; supported optimizers are {supported_optimizers()}. "
                    "Use one of them, or execution='auto' (falls back to eager) or execution='eager'."
                )
            warn_once(
                f"execution:{name}",
                f"problem {name!r}: execution='auto' runs eager: {type(problem.optimizer).__name__} has no pure step "
                f"(supported: {supported_optimizers()})",
            )
            continue
        capture = functools.partial(
            CapturedStep, name, problem.training_step, modules, state.leaves, state.functional, problem.config.grad_clip
        )
        executions[name] = StepExecution(name, execution, state.functional, capture, warn_once, record)
    return executions



def eager_only(precision: str, distributed: bool) -> str | None:
    """Why captured steps cannot run in this engine, or ``None``.

    A captured step is the user's loss, its backward and the optimizer's update, traced as they are:
    it has no autocast scope, no loss scaling and overflow check (fp16), no shard share and no
    all-reduce of its gradient (data parallel). Replaying it there would train in fp32, or let the
    ranks drift apart, without a word, so those engines run every step eager.
    """
    reasons = []
    if precision != "fp32":
        reasons.append(f"EngineConfig(precision={precision!r}) (a captured step has no autocast or loss scaling)")
    if distributed:
        reasons.append("data parallel (a captured step does not all-reduce its gradient)")
    return " and ".join(reasons) or None


def _refused(name: str, execution: str, blocker: str, warn_once: Callable[[str, str], None]) -> bool:
    """``execution="compiled"`` under ``blocker`` raises; ``"auto"`` runs eager and says so once."""
    if execution == "compiled":
        raise ValueError(
            f"problem {name!r}: execution='compiled' cannot run under {blocker}; use execution='eager' (or 'auto', "
            "which runs eager here), or precision='fp32' in one process"
        )
    warn_once(f"execution:{name}", f"problem {name!r}: execution='auto' runs eager under {blocker}")
    return True
