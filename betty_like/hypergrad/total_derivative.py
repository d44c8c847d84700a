"""The traversal: a problem's hypergradient as the total derivative of its loss, on any graph.

It is a pure function of a :class:`Program`, an immutable snapshot of every level (its loss bound to
its current batch, its parameters, method, config and a pure view of its optimizer) and of the
graph. It never sees the engine.

The hypergradient of ``root`` is the derivative of its loss with respect to its own parameters,
where every solution that responds to them (``graph.responders(root)``) is replaced by its best
response. A best response is an autograd operation (:class:`_BestResponse`): its value is the
solution's current value and its vector-Jacobian product is the solution's method's *push*.
Reverse mode over the loss then visits every path from the loss to ``root``'s parameters, so the
result is the total derivative whatever the shape of the graph. Open unrolled windows need no push:
their weights carry their graph to the parameters their steps read. Where those steps read the
real weights of a problem that responds by a push, the gradient reaching those weights is pushed
through its best response as well.

A level whose own loss reads lower solutions (a middle level) has, with ``nested="total"``, its
*total* stationarity condition as implicit residual: the objective in its push is its loss with its
own lowers replaced by their best responses to it, built again inside the push. Because every push
is differentiable (the linear solves are :class:`~._linsolve.LinearSystem` operations), this
composes to any depth. ``nested="partial"`` holds the lower solutions fixed instead (Betty's rule).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._context import HypergradContext, HypergradInfo, _identity
from ._linsolve import CurvatureEstimate, MatVec
from ._method import Method
from ._tree import Params, grads

if TYPE_CHECKING:
    from ..graph import Graph
    from ..optim import FunctionalOptimizer

log = logging.getLogger("betty_like")

_MATH_ATTENTION = (
    "hypergradients and unrolled steps run scaled_dot_product_attention with its math kernel (the fused kernels "
    "have no double backward or forward-mode derivative); plain first-order steps keep the fused kernels"
)
_said: set[str] = set()  # what this process has said once


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.info(message)


@dataclass(frozen=True)
class Level:
    """An immutable snapshot of one problem, all the traversal knows of it.

    Attributes:
        name: the problem's name.
        params: its current trainable parameters: its leaves, or an open unrolled window's weights.
        loss: its ``training_step`` on its current batch, evaluated with every problem's parameters
            taken from the complete mapping given (keys ``"<problem>.<param>"``).
        method: how a gradient passes through its solution.
        config: its :class:`~betty_like.ProblemConfig`.
        optimizer: a pure view of its optimizer.
        window: ``params`` are an open unrolled window whose graph carries the dependence on the
            parameters its steps read.
        push_wrap: applied to its method's push (precision scope, cross-process reduction of the pushed vectors).
        matvec_wrap: applied to every Hessian-vector product of its pushes (precision, reduction).
        hvp: ``(w, others) -> u -> H_ww u``: compiled Hessian-vector products of its loss in its own
            parameters ``w``, everything else at ``others`` (``compile_hypergrad``); it returns ``None``
            where they cannot be used. ``None``: eager products only.
        eigenvalue: its kept largest-eigenvalue estimate for Neumann solves (``None``: none kept).
        shared: a cotangent reaching one of its linear solves, as the adjoint right-hand side (mean over ranks).
        outputs: its ``output_loss`` at the complete mapping given, ``(outputs, loss_fn)`` (``None``:
            not defined); Gauss-Newton curvature and KFAC need it.
        module: its module (KFAC reads its layers).
        memo: what its methods keep across steps (KFAC factors), owned by the engine.
        ranks: data-parallel processes (see :class:`~._context.HypergradContext`).
    """

    name: str
    params: Params
    loss: Callable[[Params], Tensor]
    method: Method
    config: Any
    optimizer: FunctionalOptimizer
    window: bool = False
    push_wrap: Callable[[Callable], Callable] = _identity
    matvec_wrap: Callable[[MatVec], MatVec] = _identity
    hvp: Callable[[Params, Params], MatVec | None] | None = None
    eigenvalue: CurvatureEstimate | None = None
    shared: Callable[[Params], Params] = _identity
    outputs: Callable[[Params], tuple[Tensor, Callable[[Tensor], Tensor]]] | None = None
    module: nn.Module | None = None
    memo: dict[str, Any] = field(default_factory=dict)
    ranks: int = 1


@dataclass(frozen=True)
class Program:
    """The graph and one :class:`Level` per problem."""

    graph: Graph
    levels: Mapping[str, Level]


@dataclass
class Hypergradient:
    """What the traversal returns: the loss, the gradient on the root's parameters, and diagnostics."""

    loss: Tensor
    gradient: Params
    infos: dict[str, HypergradInfo] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def hypergradient(
    program: Program,
    root: str,
    values: Params | None = None,
    *,
    create_graph: bool = False,
    detach_context: bool = False,
) -> Hypergradient:
    """The total derivative of ``root``'s loss with respect to its parameters (``values``: default its current ones).

    ``create_graph`` keeps the result differentiable (an unrolled step of ``root``).
    ``detach_context`` evaluates everything else at detached values (a truncated unrolled step).

    Every forward in here may be differentiated twice (the pushes) or kept for a later backward
    (unrolled steps), so ``scaled_dot_product_attention`` runs its math kernel: the fused kernels
    have no double backward. A plain first-order step keeps the fused ones.
    """
    _say_once(_MATH_ATTENTION)
    with sdpa_kernel([SDPBackend.MATH]):
        return _total_derivative(program, root, values, create_graph, detach_context)


def _total_derivative(
    program: Program, root: str, values: Params | None, create_graph: bool, detach_context: bool
) -> Hypergradient:
    level = program.levels[root]
    values = level.params if values is None else values
    base = {k: t.detach() if detach_context else t for lvl in program.levels.values() for k, t in lvl.params.items()}
    record = _Record()
    responses = _respond(program, root, {root: values}, base, record)
    loss = level.loss(_merge(base, responses))
    bridged = [] if detach_context else _bridged(program, root)
    targets = {**values, **{k: base[k] for name in bridged for k in program.levels[name].params}}
    found = grads(loss, targets, create_graph=create_graph, retain_graph=create_graph or _has_windows(program))
    gradient = {k: found[k] for k in values}
    for name in bridged:  # what reached its real weights through unrolled steps, pushed through its best response
        keys = list(program.levels[name].params)
        extra = grads(
            [responses[name][k] for k in keys],
            values,
            grad_outputs=[found[k] for k in keys],
            create_graph=create_graph,
            retain_graph=True,
        )
        gradient = {k: gradient[k] + extra[k] for k in gradient}
    return Hypergradient(loss, gradient, record.infos, record.warnings)


def _has_windows(program: Program) -> bool:
    """Open windows are read by every upper problem that consumes them: their graphs must survive a backward."""
    return any(level.window for level in program.levels.values())


def _bridged(program: Program, root: str) -> list[str]:
    """Responders with a push whose real weights were read by unrolled steps (of another responder of ``root``)."""
    responders = program.graph.responders(root)
    windows = [n for n in responders if program.levels[n].window]
    return [
        n
        for n in responders
        if not program.levels[n].window and any(n in program.graph.inputs(w) for w in windows)
    ]


@dataclass
class _Record:
    infos: dict[str, HypergradInfo] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add(self, info: HypergradInfo) -> None:
        """Keep the latest push of each lower problem, unless an earlier one in this traversal failed."""
        previous = self.infos.get(info.problem)
        if previous is not None and _failed(previous) and not _failed(info):
            return
        self.infos[info.problem] = info
        solve = info.solve
        if solve is None or solve.failed or not solve.solver.endswith("+minres"):
            return
        if solve.negative_curvature:
            found = "its Hessian is indefinite here (cg met non-positive curvature)"
        else:
            step = "the step" if info.method == "neumann" else "its learning rate"
            found = (
                f"its {info.method} iteration diverged (its Hessian is indefinite here, or {step} is above 2 / L), "
                "so its partial sum is no answer"
            )
        message = (
            f"problem {info.problem!r}: {found}; the solve continued with MINRES, valid for a symmetric indefinite "
            "system. If its loss should be convex near its solution, train it further, set ProblemConfig(damping=...), "
            "or use ProblemConfig(curvature='gauss_newton'), whose products are positive semi-definite; "
            "ProblemConfig(indefinite='fail') reports the failure instead"
        )
        if message not in self.warnings:
            self.warnings.append(message)


def _failed(info: HypergradInfo) -> bool:
    return info.solve is not None and info.solve.failed


def _merge(base: Params, responses: Mapping[str, Params]) -> Params:
    merged = dict(base)
    for params in responses.values():
        merged.update(params)
    return merged


def _respond(
    program: Program, root: str, given: Mapping[str, Params], base: Params, record: _Record
) -> dict[str, Params]:
    """``given`` plus the best response of every responder of ``root``, in response order.

    Micro-batches (``accumulate_steps``) and data parallel are the engine's business: it splits the
    loss it is handed, and every derivative reaching these values is already summed over shards
    (averaged over ranks), so a best response pushes once.
    """
    values = dict(given)
    for name in program.graph.responders(root):
        level = program.levels[name]
        if level.window:
            values[name] = {k: base[k] for k in level.params}
        else:
            inputs = {p: values[p] for p in program.graph.inputs(name) if p in values}
            values[name] = _Responder(program, level, inputs, base, record).apply()
    return values


class _Responder:
    """One best response ``w*(x)`` of ``level`` to ``inputs``, as an autograd operation."""

    def __init__(self, program: Program, level: Level, inputs: Mapping[str, Params], base: Params, record: _Record) -> None:
        self.program = program
        self.level = level
        self.base = base
        self.record = record
        self.owner_of = {k: name for name, params in inputs.items() for k in params}
        self.input_keys = list(self.owner_of)
        self.output_keys = list(level.params)
        self.inputs = [inputs[self.owner_of[k]][k] for k in self.input_keys]

    def apply(self) -> Params:
        current = [self.level.params[k].detach() for k in self.output_keys]
        outputs = _BestResponse.apply(self, *self.inputs, *current)
        return dict(zip(self.output_keys, outputs, strict=True))

    def values(self, w: Params, x: Params) -> Params:
        """Every parameter at ``w``, ``x``; with ``nested="total"`` the level's lowers respond to both."""
        given: dict[str, Params] = {self.level.name: w}
        for k, t in x.items():
            given.setdefault(self.owner_of[k], {})[k] = t
        if self.level.config.nested != "total":
            return _merge(self.base, given)
        return _merge(self.base, _respond(self.program, self.level.name, given, self.base, self.record))

    def objective(self, w: Params, x: Params) -> Tensor:
        """The level's loss at ``w``, ``x``."""
        return self.level.loss(self.values(w, x))

    def split(self, w: Params, x: Params) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The level's loss at ``w``, ``x`` as ``(outputs, loss_fn)``."""
        return self.level.outputs(self.values(w, x))

    def push(self, v: Params, inputs: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
        """``v^T dw*/dx`` at the current solution, differentiable when the caller builds a graph."""
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if create_graph:  # aliases: partial derivatives here, the full chain rule beyond them
                w = {k: t.view_as(t) for k, t in zip(self.output_keys, outputs, strict=True)}
                x = {k: t.view_as(t) for k, t in zip(self.input_keys, inputs, strict=True)}
            else:
                w = {k: t.detach().requires_grad_(True) for k, t in zip(self.output_keys, outputs, strict=True)}
                x = {k: t.detach().requires_grad_(True) for k, t in zip(self.input_keys, inputs, strict=True)}
            level = self.level
            nests = level.config.nested == "total" and bool(self.program.graph.responders(level.name))
            compiled = None if level.hvp is None or nests else partial(level.hvp, w, _merge(self.base, {"x": x}))
            context = HypergradContext(
                level.name,
                self.objective,
                w,
                x,
                v,
                level.config,
                level.optimizer,
                create_graph=create_graph,
                matvec_wrap=level.matvec_wrap,
                compiled_hvp=compiled,
                eigenvalue=level.eigenvalue,
                shared=level.shared,
                outputs=None if level.outputs is None else self.split,
                module=level.module,
                memo=level.memo,
                ranks=level.ranks,
            )
            pushed, info = level.push_wrap(_unless_zero(level.method.push))(context)
        if info is not None:
            self.record.add(info)
        return [pushed[k] if create_graph else pushed[k].detach() for k in self.input_keys]


class _BestResponse(torch.autograd.Function):
    """Value: the current solution. Vector-Jacobian product: the solution's method's push."""

    @staticmethod
    def forward(ctx, responder: _Responder, *tensors: Tensor):
        count = len(responder.input_keys)
        outputs = tuple(t.clone() for t in tensors[count:])
        ctx.responder = responder
        ctx.save_for_backward(*tensors[:count], *outputs)
        return outputs

    @staticmethod
    def backward(ctx, *cotangents: Tensor):
        responder: _Responder = ctx.responder
        count = len(responder.input_keys)
        saved = ctx.saved_tensors
        inputs, outputs = list(saved[:count]), list(saved[count:])
        v = {
            k: torch.zeros_like(o) if c is None else c
            for k, o, c in zip(responder.output_keys, outputs, cotangents, strict=True)
        }
        pushed = responder.push(v, inputs, outputs)
        return (None, *pushed, *(None for _ in outputs))


def _unless_zero(push: Callable) -> Callable:
    """``push``, skipped when it is handed an all-zero vector (its push is zero) and builds no graph.

    A zero is no shortcut when building a graph: the push may be differentiated in ``v``. The test is
    made on the vector the method receives, inside the push wrappers: under data parallel that is
    already the sum over ranks, so every rank takes the same branch (a rank skipping alone would leave
    the others waiting in the solve's collectives). One host sync for all tensors.
    """

    def pushed(ctx: HypergradContext) -> tuple[Params, HypergradInfo | None]:
        if not ctx.create_graph and not bool(torch.stack([t.any() for t in ctx.v.values()]).any()):
            return {k: torch.zeros_like(t) for k, t in ctx.x.items()}, None
        return push(ctx)

    return pushed
