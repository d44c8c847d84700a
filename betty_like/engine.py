"""``Engine``: runs a multilevel program and owns all of its changing state.

The schedule is leaf-first: every iteration steps each problem that reads no lower solution. After
``unroll_steps`` counted steps a problem reports to the problems that read it; a problem steps
once all of its lower problems have reported ``step_every`` times. Stepping a problem that reads
lower solutions takes its hypergradient (:mod:`betty_like.backprop`) and hands it to the user's
own optimizer. Lower problems whose method is unrolled take their steps as differentiable
functions instead (:mod:`betty_like.optim`), and their weights live here until the problem that
differentiates through them has stepped.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import backprop
from ._data import BatchStream
from ._functional import ProblemModules, call_with
from .backends.compiled import ExecutionChoice, StepExecution, plan_executions
from .backends.registry import swap
from .config import EngineConfig
from .graph import Graph
from .hypergrad import HypergradInfo, Method, get_method
from .optim import FunctionalOptimizer, Params, State, clip_grad_norm
from .problem import Problem

log = logging.getLogger("betty_like")


@dataclass
class _ProblemState:
    """Everything the engine tracks for one problem between steps."""

    problem: Problem
    method: Method
    leaves: Params
    functional: FunctionalOptimizer
    unrolls: bool
    window_length: int
    stream: BatchStream
    batch: Any = None
    steps: int = 0
    rounds: int = 0
    ready: set[str] = field(default_factory=set)
    fast: Params | None = None
    fast_state: State | None = None
    window_steps: int = 0
    loss: float | None = None
    gradient: Params | None = None


class Engine:
    """Runs problems wired by ``dependencies`` and computes hypergradients through the levels.

    Args:
        problems: the :class:`Problem` instances, any order.
        dependencies: ``{"u2l": {upper: [lowers]}, "l2u": {lower: [uppers]}}`` with problems or
            their names; see :mod:`betty_like.graph`.
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
                raise TypeError(
                    f"Engine takes Problem instances, got {type(p).__name__}: subclass betty_like.Problem"
                )
        names = [p.name for p in problems]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"problem names must be unique, {duplicates} appear more than once")
        for p in problems:
            if p._engine is not None:
                raise ValueError(
                    f"problem {p.name!r} already belongs to another Engine: create a new instance"
                )
        self.config = config if config is not None else EngineConfig()
        if not isinstance(self.config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(self.config).__name__}")
        self.problems: dict[str, Problem] = {p.name: p for p in problems}
        self.graph = Graph(names, dependencies)
        self.device = torch.device(self.config.device) if self.config.device is not None else None
        self._states = {p.name: self._build_state(p) for p in problems}
        self._modules = ProblemModules({n: p.module for n, p in self.problems.items()})
        for p in problems:
            p._engine = self
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.validation_history: list[dict[str, Any]] = []
        self.hypergrad_info: dict[str, dict[str, HypergradInfo]] = {}
        self.skipped: dict[str, int] = {n: 0 for n in names}
        self._warned: set[str] = set()
        self._executions = plan_executions(self._states, self.graph.lowers, self._modules, self._warn_once)
        trainable = {id(t) for t in self._modules.parameters() if t.requires_grad}
        self._sole = {n for n, s in self._states.items() if trainable == {id(t) for t in s.leaves.values()}}

    # ------------------------------------------------------------------ construction checks
    def _build_state(self, p: Problem) -> _ProblemState:
        if p.module is None or p.optimizer is None:
            missing = "module" if p.module is None else "optimizer"
            raise ValueError(
                f"problem {p.name!r} has no {missing}: every problem needs a module with parameters and an "
                "optimizer over them, e.g. optimizer=torch.optim.SGD(module.parameters(), lr=0.1)"
            )
        if self.device is not None:
            p.module.to(self.device)
        if p.config.backend is not None:  # same parameter objects after the swap: the checks below still hold
            swap(p.module, p.config.backend, prefix=f"{p.name}.")
        by_id = {id(t): f"{p.name}.{n}" for n, t in p.module.named_parameters()}
        leaves: Params = {}
        for group in p.optimizer.param_groups:
            for t in group["params"]:
                if id(t) not in by_id:
                    raise ValueError(
                        f"problem {p.name!r}: its optimizer holds a tensor of shape {tuple(t.shape)} that is not a "
                        "parameter of its module; build the optimizer from module.parameters()"
                    )
                leaves[by_id[id(t)]] = t
        if not leaves:
            raise ValueError(
                f"problem {p.name!r} has an optimizer with no parameters: give it its module's parameters"
            )
        method = get_method(p.config.hypergrad)
        has_uppers = bool(self.graph.uppers(p.name))
        unrolls = method.unrolled and has_uppers
        if unrolls and self.graph.lowers(p.name):
            raise ValueError(
                f"problem {p.name!r} uses hypergrad={method.name!r} but also reads lower solutions "
                f"{self.graph.lowers(p.name)}; differentiating through its hypergradient steps is not supported. "
                "Use an implicit method (neumann, cg, fixed_point) or darts for it."
            )
        if has_uppers and method.second_order:
            first_order_only = sorted(
                {type(m).__name__ for m in p.module.modules() if getattr(m, "first_order_only", False)}
            )
            if first_order_only:
                raise ValueError(
                    f"problem {p.name!r} uses hypergrad={method.name!r}, which needs second derivatives through its "
                    f"model, but {first_order_only} in its module support first-order gradients only: use "
                    "hypergrad='darts' or 'sama', or a layer configuration with double backward"
                )
        differentiable = unrolls or (has_uppers and method.name == "fixed_point")
        functional = FunctionalOptimizer.from_optimizer(p.optimizer, by_id, p.name, differentiable)
        if (
            has_uppers
            and method.name == "sama"
            and type(p.optimizer) not in (torch.optim.Adam, torch.optim.AdamW)
        ):
            raise TypeError(
                f"problem {p.name!r} uses hypergrad='sama', which needs Adam or AdamW, but its optimizer is "
                f"{type(p.optimizer).__name__}: use hypergrad='darts' instead"
            )
        readers = self.graph.readers(p.name)
        patience = max((self.problems[r].config.step_every for r in readers), default=1)
        stream = BatchStream(p.name, p.data, self.device)
        return _ProblemState(p, method, leaves, functional, unrolls, p.config.unroll_steps * patience, stream)

    # ------------------------------------------------------------------ parameters and losses
    def current_params(self) -> Params:
        """Every problem's current parameters: unrolled weights where a window is open, else the leaves."""
        params: Params = {}
        for state in self._states.values():
            params.update(state.fast if state.fast is not None else state.leaves)
        return params

    def leaves(self, name: str) -> Params:
        """The real (leaf) trainable parameters of problem ``name``, keyed ``"<problem>.<param>"``."""
        return self._states[name].leaves

    def state_of(self, name: str) -> _ProblemState:
        return self._states[name]

    def execution_choices(self, name: str) -> dict[tuple, ExecutionChoice]:
        """How problem ``name``'s plain steps ran, per batch shape (empty when they all run eager)."""
        execution = self._executions.get(name)
        return dict(execution.choices) if execution is not None else {}

    def last_gradient(self, name: str) -> Params | None:
        """The (hyper)gradient problem ``name`` handed to its optimizer at its last step, before clipping."""
        return self._states[name].gradient

    def loss(self, name: str, batch: Any, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Problem ``name``'s loss on ``batch`` with ``params`` substituted (default: current ones), checked."""
        step = self.problems[name].training_step
        if params is None and all(state.fast is None for state in self._states.values()):
            loss = step(batch)  # the modules already hold the current parameters: no substitution needed
        else:
            params = self.current_params() if params is None else params
            loss = call_with(self._modules, params, step, batch)
        if not torch.is_tensor(loss):
            raise TypeError(
                f"problem {name!r}: training_step must return a scalar tensor, got {type(loss).__name__} "
                f"(iteration {self.iteration})"
            )
        if loss.numel() != 1:
            raise ValueError(
                f"problem {name!r}: training_step returned a tensor of shape {tuple(loss.shape)} at iteration "
                f"{self.iteration}; return a scalar, e.g. loss.mean()"
            )
        return loss if loss.dim() == 0 else loss.reshape(())

    def batch(self, name: str) -> Any:
        """The batch problem ``name`` used last, drawing its first one if it has none yet."""
        state = self._states[name]
        if state.batch is None:
            state.batch = state.stream.next(self.iteration)
        return state.batch

    def _finite_or_skip(self, name: str, loss: Tensor) -> float | None:
        """The loss as a float (one host sync, shared with logging), or None if the step is to be skipped."""
        value = float(loss.detach())
        if math.isfinite(value):
            return value
        state = self._states[name]
        if state.problem.config.on_nonfinite == "skip":
            self.skipped[name] += 1
            self._warn_once(
                f"skip:{name}",
                f"problem {name!r}: non-finite loss, skipping its steps (counted in engine.skipped)",
            )
            return None
        raise FloatingPointError(
            f"problem {name!r}: training_step returned {value} at iteration {self.iteration} (its step "
            f"{state.steps}); fix the loss, lower the learning rate, or set ProblemConfig(on_nonfinite='skip')"
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # ------------------------------------------------------------------ the schedule
    def run(self) -> Engine:
        """Run ``config.train_iters`` iterations (validating every ``valid_every``); returns self."""
        if self.config.seed is not None:
            torch.manual_seed(self.config.seed)
        for _ in range(self.config.train_iters):
            self.step()
        self.sync()
        return self

    def sync(self) -> None:
        """Write every open unrolled window into the real modules and optimizers.

        Called at the end of :meth:`run`, so that the user's modules hold the trained weights even
        if training stopped between an unrolled step and the upper step that would consume it.
        """
        self._close_windows(self.graph.names)

    def step(self) -> None:
        """One iteration: every leaf problem steps once, and whatever becomes ready steps after it."""
        self.iteration += 1
        for name in self.graph.leaves():
            self._advance(name)
        if self.iteration % self.config.log_every == 0:
            for name, state in self._states.items():
                if state.loss is not None:
                    self.history.append({"iteration": self.iteration, "problem": name, "loss": state.loss})
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
                metrics = call_with(self._modules, self.current_params(), step)
            if not isinstance(metrics, Mapping):
                raise TypeError(
                    f"problem {name!r}: validation_step must return a dict of metrics, got {type(metrics).__name__}"
                )
            results[name] = {k: float(v) for k, v in metrics.items()}
            self.validation_history.append({"iteration": self.iteration, "problem": name, **results[name]})
        return results

    def _advance(self, name: str) -> None:
        """Step ``name`` (if its rounds allow) and report to its readers after ``unroll_steps`` steps."""
        state = self._states[name]
        state.rounds += 1
        if state.rounds % state.problem.config.step_every:
            return
        counted = self._step_problem(name)
        if not counted:
            return
        if state.steps % state.problem.config.unroll_steps:
            return
        for reader in self.graph.readers(name):
            reader_state = self._states[reader]
            reader_state.ready.add(name)
            if reader_state.ready >= set(self.graph.lowers(reader)):
                reader_state.ready.clear()
                self._advance(reader)

    def _step_problem(self, name: str) -> bool:
        """One step of ``name``; returns whether it counts towards its readers (not warm-up, not skipped)."""
        state = self._states[name]
        state.batch = state.stream.next(self.iteration)
        warming = state.steps < state.problem.config.warmup_steps
        done = self._unrolled_step(name) if state.unrolls and not warming else self._optimizer_step(name)
        if not done:
            return False
        state.steps += 1
        return state.steps > state.problem.config.warmup_steps

    def _optimizer_step(self, name: str) -> bool:
        """A real step of the problem's optimizer: captured and replayed where its execution says so."""
        execution = self._executions.get(name)
        if execution is None:
            return self._eager_step(name)
        return execution.step(
            self._states[name].batch, lambda: self._eager_step(name), lambda: self._replayed_step(name, execution)
        )

    def _replayed_step(self, name: str, execution: StepExecution) -> bool:
        """The captured step (:mod:`betty_like.backends.compiled`): same bookkeeping as the eager one."""
        state = self._states[name]
        context = {k: v.detach() for s in self._states.values() if s.fast is not None for k, v in s.fast.items()}
        loss, gradient, commit = execution.replay(state.batch, context)
        value = self._finite_or_skip(name, loss)
        if value is None:
            return False
        commit()
        state.gradient = gradient
        if state.problem.scheduler is not None:
            state.problem.scheduler.step()
        state.loss = value
        return True

    def _eager_step(self, name: str) -> bool:
        """A real step of the user's optimizer, on the gradient or (with lower problems) the hypergradient."""
        state = self._states[name]
        problem = state.problem
        leaves = list(state.leaves.values())
        problem.optimizer.zero_grad(set_to_none=True)
        if self.graph.lowers(name):
            loss, grads, infos = backprop.hypergradient(self, name)
            self._record_infos(name, infos)
            value = self._finite_or_skip(name, loss)
            if value is None:
                return False
            for key, leaf in state.leaves.items():
                leaf.grad = grads[key].detach().to(leaf.dtype)
        else:
            loss = self.loss(name, state.batch)
            value = self._finite_or_skip(name, loss)
            if value is None:
                return False
            # only this problem's parameters receive gradients; restricting the backward costs ~5% of a tiny
            # step, so a problem alone in its engine and owning every trainable parameter skips it
            torch.autograd.backward(loss, inputs=None if name in self._sole else leaves)
        state.gradient = {k: leaf.grad for k, leaf in state.leaves.items() if leaf.grad is not None}
        if problem.config.grad_clip is not None:
            state.gradient = {k: g.clone() for k, g in state.gradient.items()}
            torch.nn.utils.clip_grad_norm_(leaves, problem.config.grad_clip)
        problem.optimizer.step()
        if problem.scheduler is not None:
            problem.scheduler.step()
        if self.graph.lowers(name):
            self._close_windows(self.graph.descendants(name))
        state.loss = value
        return True

    def _record_infos(self, name: str, infos: dict[str, HypergradInfo]) -> None:
        self.hypergrad_info[name] = infos
        for lower, info in infos.items():
            if info.solve is not None and info.solve.negative_curvature:
                self._warn_once(
                    f"curvature:{lower}",
                    f"problem {lower!r}: cg met non-positive curvature; set ProblemConfig(damping=...) or use neumann",
                )

    def _unrolled_step(self, name: str) -> bool:
        """A differentiable step: the new weights keep their graph to the upper parameters.

        Within a window of ``window_length`` steps only the last ``truncate`` keep a graph. For
        ``first_order`` the gradient is taken at detached weights, so the Hessian terms in this
        problem's own parameters drop out while the dependence on the upper parameters stays.
        """
        state = self._states[name]
        problem = state.problem
        if state.fast is None:
            state.functional.reload_state()
            state.fast, state.fast_state = dict(state.leaves), state.functional.state
            state.window_steps = 0
        state.window_steps += 1
        truncate = problem.config.truncate
        keep_graph = truncate is None or state.window_steps > state.window_length - truncate
        origin = state.fast if keep_graph else {k: v.detach() for k, v in state.fast.items()}
        if keep_graph and state.method.through_w:
            # after truncated (graph-free) steps the weights are plain tensors: start a fresh graph at them
            origin = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in origin.items()}
            start = origin
            params = {**self.current_params(), **start}
        else:
            start = {k: v.detach().requires_grad_(True) for k, v in origin.items()}
            context = self.current_params()
            if not keep_graph:
                context = {k: v.detach() for k, v in context.items()}
            params = {**context, **start}
        loss = self.loss(name, state.batch, params)
        value = self._finite_or_skip(name, loss)
        if value is None:
            return False
        grads = dict(
            zip(start, torch.autograd.grad(loss, list(start.values()), create_graph=keep_graph), strict=False)
        )
        if problem.config.grad_clip is not None:
            grads = clip_grad_norm(grads, problem.config.grad_clip)
        state.fast, state.fast_state = state.functional.step(origin, grads, state.fast_state)
        if problem.scheduler is not None:
            with warnings.catch_warnings():
                # the update happened functionally, so torch's "optimizer.step() was never called" check misfires
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                problem.scheduler.step()
        state.loss = value
        return True

    def _close_windows(self, names: Iterable[str]) -> None:
        """Write the unrolled weights of ``names`` into the real modules (after their upper problem stepped)."""
        for name in names:
            state = self._states[name]
            if state.fast is None:
                continue
            with torch.no_grad():
                for key, leaf in state.leaves.items():
                    leaf.copy_(state.fast[key])
            state.functional.write_back(state.fast_state)
            state.fast = None
            state.fast_state = None
