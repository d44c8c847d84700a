"""What the engine fixes about each problem when it is built, and the checks that make it safe.

Every mistake found here raises before the first step with the problem, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._data import BatchStream
from .backends.registry import check_policy, first_order_only_layers, swap
from .config import ProblemConfig
from .distributed import check_exact
from .graph import Graph
from .hypergrad import CurvatureEstimate, Method, get_method
from .optim import FunctionalOptimizer, Params
from .problem import Problem


@dataclass(frozen=True)
class Setup:
    """The fixed facts of one problem inside an engine.

    Attributes:
        problem: the user's problem.
        method: its hypergradient method (how gradients of the problems above pass through it).
        leaves: the parameters its optimizer holds, keyed ``"<problem>.<param>"``.
        functional: the pure view of its optimizer.
        unrolls: it takes unrolled (differentiable) steps for the problems above it.
        period: steps of one unrolled window: its ``unroll_steps`` times its slowest reader's ``step_every``.
        stream: its batches.
        config: a copy of its config as the engine was built with it (changing it later is refused).
        eigenvalue: its kept largest-Hessian-eigenvalue estimate for Neumann solves through it.
        memo: what its hypergradient method keeps across steps (KFAC factors); not checkpointed.
    """

    problem: Problem
    method: Method
    leaves: Params
    functional: FunctionalOptimizer
    unrolls: bool
    period: int
    stream: BatchStream
    config: ProblemConfig
    eigenvalue: CurvatureEstimate = field(default_factory=CurvatureEstimate)
    memo: dict[str, Any] = field(default_factory=dict)


def set_up_all(
    problems: dict[str, Problem], graph: Graph, device: torch.device | None, shard: Any = None
) -> dict[str, Setup]:
    """Every problem's :class:`Setup`; a parameter trained by two problems is refused, naming both."""
    setups: dict[str, Setup] = {}
    owners: dict[int, str] = {}
    for name, p in problems.items():
        setups[name] = set_up(p, graph, problems, device, shard)
        for key, t in setups[name].leaves.items():
            other = owners.setdefault(id(t), key)
            if other != key:
                raise ValueError(
                    f"one parameter is trained by two problems, as {other!r} and as {key!r}: each problem must own "
                    "its parameters. Give one of them a copy (or freeze it there with requires_grad_(False) and "
                    "leave it out of that problem's optimizer), or read the other problem's module by name instead"
                )
    return setups


def check_problems(problems: Iterable[Problem]) -> list[Problem]:
    """The problems as a list: all ``Problem`` instances, uniquely named, not in another engine."""
    problems = list(problems)
    for p in problems:
        if not isinstance(p, Problem):
            raise TypeError(f"Engine takes Problem instances, got {type(p).__name__}: subclass betty_like.Problem")
    names = [p.name for p in problems]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"problem names must be unique, {duplicates} appear more than once")
    for p in problems:
        if p._engine is not None:  # noqa: SLF001 (set by the engine that owns it)
            raise ValueError(f"problem {p.name!r} already belongs to another Engine: create a new instance")
    return problems


def set_up(
    p: Problem, graph: Graph, problems: dict[str, Problem], device: torch.device | None, shard: Any = None
) -> Setup:
    if p.module is None or p.optimizer is None:
        missing = "module" if p.module is None else "optimizer"
        raise ValueError(
            f"problem {p.name!r} has no {missing}: every problem needs a module with parameters and an "
            "optimizer over them, e.g. optimizer=torch.optim.SGD(module.parameters(), lr=0.1)"
        )
    if device is not None:
        p.module.to(device)
    _check_closure(p)
    _swap_backends(p)  # same parameter objects after the swap: the checks below still hold
    by_id = {id(t): f"{p.name}.{n}" for n, t in p.module.named_parameters()}
    leaves: Params = {}
    frozen = 0
    for group in p.optimizer.param_groups:
        for t in group["params"]:
            if id(t) not in by_id:
                raise ValueError(
                    f"problem {p.name!r}: its optimizer holds a tensor of shape {tuple(t.shape)} that is not a "
                    "parameter of its module; build the optimizer from module.parameters()"
                )
            if not t.requires_grad:  # frozen after the optimizer was built: torch.optim skips it, so do we
                frozen += 1
                continue
            leaves[by_id[id(t)]] = t
    if not leaves and frozen:
        raise ValueError(
            f"problem {p.name!r}: every parameter in its optimizer is frozen (requires_grad=False, {frozen} tensors), "
            "so it has nothing to train: unfreeze some of them, or leave the problem out"
        )
    if not leaves:
        raise ValueError(f"problem {p.name!r} has an optimizer with no parameters: give it its module's parameters")
    _check_scheduler(p)
    method = get_method(p.config.hypergrad)
    served = [n for n in graph.names if p.name in graph.responders(n)]
    if served:
        check_exact(p.name, method.name, data_parallel=shard is not None)
        _check_method(p, method, graph, problems)
    unrolls = method.unrolled and bool(served)
    if unrolls and p.config.unroll_memory != "graph":
        _check_unroll_memory(p, graph, problems, served)
    functional = FunctionalOptimizer.from_optimizer(
        p.optimizer, by_id, p.name, differentiable=bool(served) and method.steps_optimizer
    )
    patience = max((problems[r].config.step_every for r in graph.readers(p.name)), default=1)
    stream = BatchStream(p.name, p.data, device, shard)
    period = p.config.unroll_steps * patience
    return Setup(p, method, leaves, functional, unrolls, period, stream, dataclasses.replace(p.config))


def check_unchanged(setups: Mapping[str, Setup]) -> None:
    """A problem's config or data changed after the engine was built is refused, never silently ignored.

    The engine fixes methods, schedules, optimizer views and batch streams from them when it is built.
    """
    for name, setup in setups.items():
        p = setup.problem
        if p.config != setup.config:
            changed = sorted(
                f.name for f in dataclasses.fields(setup.config) if getattr(p.config, f.name) != getattr(setup.config, f.name)
            )
            values = ", ".join(f"{f}={getattr(p.config, f)!r} (was {getattr(setup.config, f)!r})" for f in changed)
            raise ValueError(
                f"problem {name!r}: its config changed after the Engine was built ({values}); the engine fixed its "
                "schedule and methods from the old one: build a new Engine with new Problem instances to change it"
            )
        if p.data is not setup.stream.data:
            raise ValueError(
                f"problem {name!r}: its data was replaced after the Engine was built, and the engine reads the old "
                "one: pass the data when creating the Problem, or build a new Engine with new Problem instances"
            )


def _check_closure(p: Problem) -> None:
    """The engine calls ``optimizer.step()`` with the gradient it computed: an optimizer that needs a closure cannot work.

    LBFGS re-evaluates the loss several times per step through its closure; the engine takes one
    gradient (or hypergradient) per step, inside a transaction, and differentiates steps as pure functions.
    """
    closure = inspect.signature(p.optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"problem {p.name!r}: its optimizer {type(p.optimizer).__name__} needs a closure that re-evaluates the "
            "loss at every step, which the engine cannot give it (it computes one gradient or hypergradient per "
            "step and steps the optimizer with it). Use an optimizer whose step takes no closure, e.g. "
            "torch.optim.SGD, Adam or AdamW (those the unrolled methods can also differentiate through)"
        )


def _check_scheduler(p: Problem) -> None:
    """The engine steps a scheduler after every step with no argument: say now if that cannot work."""
    scheduler = p.scheduler
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TypeError(
            f"problem {p.name!r}: ReduceLROnPlateau needs a metric at every step, which the engine cannot give it: "
            "pass scheduler=None and call scheduler.step(metric) in your validation_step"
        )
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(
            f"problem {p.name!r}: scheduler must be a torch.optim.lr_scheduler.LRScheduler built on its optimizer, "
            f"got {type(scheduler).__name__}"
        )
    if scheduler.optimizer is not p.optimizer:
        raise ValueError(
            f"problem {p.name!r}: its scheduler drives another optimizer than the problem's: build it on "
            "the problem's own optimizer"
        )


def _swap_backends(p: Problem) -> None:
    """Swap the problem's operator policies into its module; a wrong algorithm name fails here, before step one."""
    for op, policy in p.config.backends.items():
        try:
            check_policy(op, policy)  # imports the op's backend, which registers its algorithms
        except (TypeError, ValueError) as error:
            raise ValueError(f"problem {p.name!r}: ProblemConfig.backends[{op!r}]={policy!r} is invalid: {error}") from None
        swap(p.module, policy, op=op, prefix=f"{p.name}.")


def _check_method(p: Problem, method: Method, graph: Graph, problems: dict[str, Problem]) -> None:
    """``method`` can carry the gradients of the problems above ``p`` through its solution."""
    if method.optimizers is not None and type(p.optimizer) not in method.optimizers:
        raise TypeError(
            f"problem {p.name!r} uses hypergrad={method.name!r}, which supports the optimizers "
            f"{[c.__name__ for c in method.optimizers]}, but its optimizer is {type(p.optimizer).__name__}: "
            "use one of them, or hypergrad='darts'"
        )
    if (method.needs_outputs or p.config.curvature == "gauss_newton") and type(p).output_loss is Problem.output_loss:
        what = "hypergrad='kfac'" if method.needs_outputs else "curvature='gauss_newton'"
        raise ValueError(
            f"problem {p.name!r} uses {what}, which needs its loss split into model outputs and a loss of those "
            f"outputs, but {type(p).__name__} defines no output_loss(self, batch): return (outputs, loss_fn) with "
            "loss_fn(outputs) == training_step(batch), e.g. (logits, lambda z: F.cross_entropy(z, y)); "
            "or use curvature='hessian' with hypergrad='cg'"
        )
    if method.second_order:  # the method's own flag, read with the layers' FirstOrderOnly capability
        first_order_only = first_order_only_layers(p.module)
        if first_order_only:
            raise ValueError(
                f"problem {p.name!r} uses hypergrad={method.name!r}, which needs second derivatives through its "
                f"model, but {first_order_only} in its module support first-order gradients only: use "
                "hypergrad='darts' or 'sama', or a layer configuration with double backward"
            )
    if not method.unrolled:
        return
    for middle in graph.names:
        reader = problems[middle]
        if p.name not in graph.responders(middle) or reader.config.nested != "total":
            continue
        if get_method(reader.config.hypergrad).unrolled:
            continue
        roots = [r for r in graph.names if middle in graph.consumed(r)]
        if roots:
            raise ValueError(
                f"problem {p.name!r} uses hypergrad={method.name!r} below {middle!r}, whose best response "
                f"({reader.config.hypergrad!r}, nested='total') is differentiated for {roots[0]!r} through "
                f"{p.name!r}'s best response, which unrolled steps do not define. Give {p.name!r} an implicit "
                f"method, unroll {middle!r} too, or set ProblemConfig(nested='partial') on {middle!r}"
            )


def _check_unroll_memory(p: Problem, graph: Graph, problems: dict[str, Problem], served: list[str]) -> None:
    """A lean unrolled step (``remat`` / ``mixed``, blocks) can be replayed the way its backward pass will need."""
    memory, below = p.config.unroll_memory, graph.responders(p.name)
    unrolled_below = [n for n in below if get_method(problems[n].config.hypergrad).unrolled]
    if unrolled_below:
        raise ValueError(
            f"problem {p.name!r}: unroll_memory={memory!r} replays each step on its own, but its hypergradient goes "
            f"through the unrolled steps of {unrolled_below}, which depend on its weights; use "
            f"unroll_memory='graph' for {p.name!r} (remat on {unrolled_below} is fine) or an implicit method for them"
        )
    if memory == "mixed" and below:
        raise ValueError(
            f"problem {p.name!r}: unroll_memory='mixed' differentiates its loss in forward mode, but its gradient goes "
            f"through the best responses of {list(below)}, whose pushes are reverse-mode only; use "
            f"unroll_memory='remat' for {p.name!r}"
        )
    unrolling_readers = [  # they take kept unrolled steps whose gradients go through p's steps
        n for n in served if get_method(problems[n].config.hypergrad).unrolled and any(n in graph.responders(m) for m in graph.names)
    ]
    if p.config.unroll_checkpoint_every is not None and unrolling_readers:
        raise ValueError(
            f"problem {p.name!r}: unroll_checkpoint_every={p.config.unroll_checkpoint_every} recomputes its steps "
            f"without a graph, but {unrolling_readers} unroll through them and need one; leave "
            f"unroll_checkpoint_every=None for {p.name!r}"
        )
