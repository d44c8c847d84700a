"""``unroll``: reverse mode through the lower problem's own differentiable optimizer steps.

An unrolled problem takes its steps in a *window*: weights and optimizer state computed by the pure
version of its optimizer (:mod:`betty_like.optim`), which keep their graph to every parameter the
steps read. The problems above it differentiate through the window instead of pushing through a
best response. The window starts from a copy of the problem's weights, so the user's module can
hold the latest values at all times, and closes (its state written to the user's optimizer) when a
problem it responds to takes a real step. Only the last ``truncate`` steps of each period between
reports keep a graph.

With ``ProblemConfig(unroll_memory="remat")`` a step keeps only its inputs (weights, optimizer state
and the parameters it reads) instead of its whole graph, and runs again inside the backward pass
with the same random numbers and without touching buffers twice: memory per kept step falls from the
step's activations to its inputs, for one more forward and backward of the step in the backward pass.

A middle problem unrolls through its own *hypergradient* steps: each step's gradient is the total
derivative through its lowers, taken with ``create_graph=True``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..optim import clip_grad_norm
from ._method import Method
from ._tree import Params, detach
from .total_derivative import Hypergradient, Program, hypergradient

if TYPE_CHECKING:
    from ..optim import FunctionalOptimizer, State


def keeps_graph(truncate: int | None, step_in_period: int, period: int) -> bool:
    """Whether step ``step_in_period`` (1-based) of a ``period``-step reporting period keeps its graph."""
    return truncate is None or step_in_period > period - truncate


def window_gradient(
    program: Program, root: str, weights: Params, keep_graph: bool, through_w: bool, create_graph: bool | None = None
) -> tuple[Hypergradient, Params]:
    """``(hypergradient at the window's weights, the weights the step starts from)``.

    With ``through_w`` (``unroll``) the gradient is a function of the weights themselves, so the
    Hessian terms in them stay; otherwise (``first_order``) it is taken at detached weights, so only
    its dependence on the upper parameters is differentiated. ``create_graph=False`` gives the same
    values as a kept step without building the graph of the gradient (a rematerialized step's first run).
    """
    origin = weights if keep_graph else detach(weights)
    if keep_graph and through_w:  # after truncated (graph-free) steps, start a fresh graph at the weights
        origin = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in origin.items()}
        start = origin
    else:
        start = {k: v.detach().requires_grad_(True) for k, v in origin.items()}
    create_graph = keep_graph if create_graph is None else create_graph
    result = hypergradient(program, root, start, create_graph=create_graph, detach_context=not keep_graph)
    return result, origin


METHOD = Method(
    "unroll",
    "reverse mode through the lower problem's differentiable optimizer steps",
    None,
    through_w=True,
    steps_optimizer=True,
)


class WindowStep:
    """One unrolled step as a function of flat tensors, for :func:`rematerialized`.

    Inputs: the window's weights, its optimizer state tensors, then every other parameter the step
    reads (``context``). Outputs: the new weights and state tensors. ``run`` is what the step does in
    the ordinary (``graph``) mode; here it is run once without keeping a graph and again inside the
    backward pass.
    """

    def __init__(
        self,
        program: Program,
        root: str,
        weights: Params,
        state: State,
        optimizer: FunctionalOptimizer,
        clip: float | None,
        through_w: bool,
    ) -> None:
        self.program, self.root, self.optimizer, self.clip, self.through_w = program, root, optimizer, clip, through_w
        self.hyperparameters = optimizer.hyperparameters()  # as now: a scheduler may change them before the replay
        self.weight_keys = list(weights)
        self.state_keys = [(p, k) for p, entries in state.items() for k in entries]
        # what the step can depend on: every other level's parameters, except responders whose values the
        # traversal replaces by best responses (a plain step of theirs must not run this step's backward)
        replaced = {n for n in program.graph.responders(root) if not program.levels[n].window}
        self.context_keys = [
            k
            for name, level in program.levels.items()
            if name != root and name not in replaced
            for k, t in level.params.items()
            if t.requires_grad
        ]
        context = {k: t for level in program.levels.values() for k, t in level.params.items()}
        self.inputs = [
            *(weights[k] for k in self.weight_keys),
            *(state[p][k] for p, k in self.state_keys),
            *(context[k] for k in self.context_keys),
        ]
        self.output_state_keys: list[tuple[str, str]] = []
        self.result: Hypergradient | None = None

    def run(self, tensors: list[Tensor], differentiable: bool = True) -> list[Tensor]:
        """The step's outputs; ``differentiable=False`` computes the same values without any graph."""
        count_w, count_s = len(self.weight_keys), len(self.state_keys)
        weights = dict(zip(self.weight_keys, tensors[:count_w], strict=True))
        state: State = {}
        for (p, k), t in zip(self.state_keys, tensors[count_w : count_w + count_s], strict=True):
            state.setdefault(p, {})[k] = t
        context = dict(zip(self.context_keys, tensors[count_w + count_s :], strict=True))
        levels = {
            name: replace(level, params={k: context.get(k, t) for k, t in level.params.items()})
            for name, level in self.program.levels.items()
        }
        program = Program(self.program.graph, levels)
        result, origin = window_gradient(program, self.root, weights, True, self.through_w, create_graph=differentiable)
        gradient = result.gradient if self.clip is None else clip_grad_norm(result.gradient, self.clip)
        new_weights, new_state = self.optimizer.step(origin, gradient, state, self.hyperparameters)
        # kept without its graph: this object lives as long as the backward pass needs the inputs
        self.result = Hypergradient(result.loss.detach(), detach(result.gradient), result.infos, result.warnings)
        self.output_state_keys = [(p, k) for p, entries in new_state.items() for k in entries]
        return [*(new_weights[k] for k in self.weight_keys), *(new_state[p][k] for p, k in self.output_state_keys)]

    def split(self, outputs: list[Tensor]) -> tuple[Params, State]:
        """The new weights and state from the flat outputs."""
        count = len(self.weight_keys)
        state: State = {}
        for (p, k), t in zip(self.output_state_keys, outputs[count:], strict=True):
            state.setdefault(p, {})[k] = t
        return dict(zip(self.weight_keys, outputs[:count], strict=True)), state


def rematerialized(step: WindowStep, buffers: list[Tensor]) -> tuple[Hypergradient, Params, State]:
    """``step`` keeping only its inputs: the backward pass replays it (same random numbers, buffers untouched)."""
    outputs = _Recompute.apply(step, buffers, *step.inputs)
    assert step.result is not None  # set by the forward run
    weights, state = step.split(list(outputs))
    return step.result, weights, state


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step: WindowStep, buffers: list[Tensor], *inputs: Tensor):
        ctx.step, ctx.buffers = step, buffers
        ctx.devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():
            outputs = [o.detach() for o in step.run([t.detach() for t in inputs], differentiable=False)]
        count = len(step.weight_keys)
        counters = [o for o, (_, key) in zip(outputs[count:], step.output_state_keys, strict=True) if key == "step"]
        ctx.mark_non_differentiable(*counters)  # Adam's step count carries no gradient
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *cotangents: Tensor):
        inputs = ctx.saved_tensors
        needed = [need and t.is_floating_point() for need, t in zip(ctx.needs_input_grad[2:], inputs, strict=True)]
        create_graph = torch.is_grad_enabled()
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng)
            for device, state in zip(ctx.devices, ctx.cuda_rng, strict=True):
                torch.cuda.set_rng_state(state, device)
            kept = [b.clone() for b in ctx.buffers]  # a replayed forward must not count twice in running statistics
            fresh = [
                (t.view_as(t) if create_graph else t.detach().requires_grad_(True)) if need else t.detach()
                for t, need in zip(inputs, needed, strict=True)
            ]
            outputs = ctx.step.run(fresh)
            with torch.no_grad():
                for buffer, value in zip(ctx.buffers, kept, strict=True):
                    buffer.copy_(value)
            pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if c is not None and o.requires_grad]
            wanted = [t for t, need in zip(fresh, needed, strict=True) if need]
            found = iter(
                torch.autograd.grad(
                    [o for o, _ in pairs], wanted, [c for _, c in pairs], allow_unused=True, create_graph=create_graph
                )
                if pairs and wanted
                else [None] * len(wanted)
            )
        return (None, None, *(next(found) if need else None for need in needed))
