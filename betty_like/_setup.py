"""What the engine fixes about each problem when it is built, and the checks that make it safe.

Every mistake found here raises before the first step with the problem, the value and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ._data import BatchStream
from .backends.registry import check_policy, first_order_only_layers, swap
from .graph import Graph
from .hypergrad import Method, get_method
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
    """

    problem: Problem
    method: Method
    leaves: Params
    functional: FunctionalOptimizer
    unrolls: bool
    period: int
    stream: BatchStream


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
    _swap_backends(p)  # same parameter objects after the swap: the checks below still hold
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
        raise ValueError(f"problem {p.name!r} has an optimizer with no parameters: give it its module's parameters")
    method = get_method(p.config.hypergrad)
    served = [n for n in graph.names if p.name in graph.responders(n)]
    if served:
        _check_method(p, method, graph, problems)
    unrolls = method.unrolled and bool(served)
    if unrolls and p.config.unroll_memory == "remat":
        unrolled_below = [n for n in graph.responders(p.name) if get_method(problems[n].config.hypergrad).unrolled]
        if unrolled_below:
            raise ValueError(
                f"problem {p.name!r}: unroll_memory='remat' replays each step on its own, but its hypergradient goes "
                f"through the unrolled steps of {unrolled_below}, which depend on its weights; use "
                f"unroll_memory='graph' for {p.name!r} (remat on {unrolled_below} is fine) or an implicit method for them"
            )
    functional = FunctionalOptimizer.from_optimizer(
        p.optimizer, by_id, p.name, differentiable=bool(served) and method.steps_optimizer
    )
    patience = max((problems[r].config.step_every for r in graph.readers(p.name)), default=1)
    stream = BatchStream(p.name, p.data, device, shard)
    return Setup(p, method, leaves, functional, unrolls, p.config.unroll_steps * patience, stream)


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
