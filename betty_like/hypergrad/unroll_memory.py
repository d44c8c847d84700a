"""Memory-lean unrolled steps: ``ProblemConfig(unroll_memory="remat" | "mixed", unroll_checkpoint_every=c)``.

An unrolled step kept as a graph holds every activation of its forward and backward until the
problems above differentiate through the window: K steps cost K times a step's graph. A lean step
keeps only its inputs (weights, optimizer state and the parameters it reads) and runs again inside
the backward pass with the same random numbers and without moving buffers twice:

- ``"remat"``: the replay builds the step's graph (its gradient with ``create_graph=True``) and
  differentiates it by double backward, one step at a time.
- ``"mixed"`` (forward-over-reverse, MixFlow-MG): the replay takes the step's gradient ``g``
  without a graph, differentiates the optimizer update (clipping included) in reverse mode, which
  is first order and elementwise, and forms the second-order products of the gradient with forward
  mode: ``torch.func.jvp`` of ``torch.func.grad`` of the loss in the direction of ``g``'s cotangent
  gives ``H_ww u`` and ``H_xw u`` at once (the Hessian is symmetric), so no graph of a backward pass
  is ever built. Every optimizer the framework unrolls is supported, as the update is not in forward
  mode; the loss must be a plain function of the parameters, so a problem whose gradient goes
  through lower problems (a middle level) and BatchNorm layers in train mode are refused.

With ``unroll_checkpoint_every=c`` only every c-th step keeps its inputs; the backward pass of a
block first recomputes the inputs of its steps from the block's first one (no graph), then goes
through them one by one: about K/c + c kept inputs instead of K, for one more forward per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..optim import clip_grad_norm
from ._tree import Params, detach
from .total_derivative import Hypergradient, Program
from .unroll import keeps_graph, window_gradient

__all__ = ["WindowStep", "keeps_graph", "rematerialized", "window_gradient"]

if TYPE_CHECKING:
    from ..config import ProblemConfig
    from ..optim import FunctionalOptimizer, State


class WindowStep:
    """One lean unrolled step as a function of flat tensors, for :func:`rematerialized`.

    Inputs: the window's weights, its optimizer state tensors, then every other parameter the step
    reads (``context``). Outputs: the new weights and state tensors. ``modules`` holds every
    problem's module (under its problem's name): their buffers are kept across a replay.
    """

    def __init__(
        self,
        program: Program,
        root: str,
        weights: Params,
        state: State,
        optimizer: FunctionalOptimizer,
        config: ProblemConfig,
        through_w: bool,
        modules: nn.Module,
    ) -> None:
        self.root, self.optimizer, self.through_w = root, optimizer, through_w
        self.clip, self.mixed = config.grad_clip, config.unroll_memory == "mixed"
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
        # the root's own entry would keep this step's input weights alive: the replay passes them anew
        self.program = Program(program.graph, {**program.levels, root: replace(program.levels[root], params={})})
        self.inputs: list[Tensor] = [
            *(weights[k] for k in self.weight_keys),
            *(state[p][k] for p, k in self.state_keys),
            *(context[k] for k in self.context_keys),
        ]
        self.buffers = list(modules.buffers())
        if self.mixed:
            _refuse_batch_norm(root, modules, {root, *(k.split(".", 1)[0] for k in self.context_keys)})
        self.output_state_keys: list[tuple[str, str]] = []
        self.devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        self.rng = torch.get_rng_state()
        self.cuda_rng = [torch.cuda.get_rng_state(d) for d in self.devices]
        # block checkpointing: the step before this one in its block (None: this step keeps its inputs)
        every = config.unroll_checkpoint_every or 1
        previous = _lean_step_of(weights[self.weight_keys[0]])
        self.position = 0 if previous is None or previous.position + 1 >= every else previous.position + 1
        self.previous = previous if self.position else None
        self.kept: list[Tensor] | None = None  # a block's first step: its weights and state, for the block's replay
        self.context: list[Tensor] = []  # detached, for the block's replay
        self.replayed: list[Tensor] | None = None  # weights and state recomputed for this step's backward
        self.result: Hypergradient | None = None  # the first run's gradient, until the caller takes it

    @property
    def count(self) -> int:
        """Number of weight and state inputs (the rest is context)."""
        return len(self.weight_keys) + len(self.state_keys)

    def evaluate(self, tensors: list[Tensor], differentiable: bool) -> tuple[Hypergradient, list[Tensor]]:
        """The step's gradient and its outputs; ``differentiable=False`` computes the same values without any graph."""
        weights, state, context = self._unflatten(tensors)
        result, origin = window_gradient(
            self._program_at(weights, context), self.root, weights, True, self.through_w, create_graph=differentiable
        )
        gradient = result.gradient if self.clip is None else clip_grad_norm(result.gradient, self.clip)
        new_weights, new_state = self.optimizer.step(origin, gradient, state, self.hyperparameters)
        self.output_state_keys = [(p, k) for p, entries in new_state.items() for k in entries]
        outputs = [*(new_weights[k] for k in self.weight_keys), *(new_state[p][k] for p, k in self.output_state_keys)]
        return result, outputs

    def split(self, outputs: list[Tensor]) -> tuple[Params, State]:
        """The new weights and state from the flat outputs."""
        count = len(self.weight_keys)
        state: State = {}
        for (p, k), t in zip(self.output_state_keys, outputs[count:], strict=True):
            state.setdefault(p, {})[k] = t
        return dict(zip(self.weight_keys, outputs[:count], strict=True)), state

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Inside: the random state of this step's first run; buffers are left as they were found."""
        with torch.random.fork_rng(devices=self.devices), torch.enable_grad():
            self.restore_rng()
            kept = [b.clone() for b in self.buffers]  # a replayed forward must not count twice in running statistics
            try:
                yield
            finally:
                with torch.no_grad():
                    for buffer, value in zip(self.buffers, kept, strict=True):
                        buffer.copy_(value)

    def restore_rng(self) -> None:
        """Put the generators back to where this step's first run started."""
        torch.set_rng_state(self.rng)
        for device, state in zip(self.devices, self.cuda_rng, strict=True):
            torch.cuda.set_rng_state(state, device)

    def block_inputs(self) -> list[Tensor]:
        """This step's weights and state, recomputed (with those of the steps between) from its block's first step."""
        if self.replayed is None:
            chain = [self]
            while chain[-1].previous is not None:
                chain.append(chain[-1].previous)
            chain.reverse()
            assert chain[0].kept is not None  # a block's first step keeps its inputs
            tensors = chain[0].kept
            for step, following in zip(chain, chain[1:], strict=False):
                with step.replaying():
                    _, outputs = step.evaluate([*tensors, *step.context], differentiable=False)
                following.replayed = tensors = [o.detach() for o in outputs]
        inputs, self.replayed = self.replayed, None
        return inputs

    def mixed_vjp(self, tensors: list[Tensor], cotangents: list[Tensor | None]) -> list[Tensor]:
        """Cotangents of every input: the update in reverse mode, the gradient's products in forward mode."""
        weights, state, context = self._unflatten(tensors)
        level = self._program_at(weights, context).levels[self.root]
        base = {k: t.detach() for lvl in self.program.levels.values() for k, t in lvl.params.items()}

        def loss(w: Params, x: Params) -> Tensor:
            return level.loss({**base, **x, **w})

        with sdpa_kernel([SDPBackend.MATH]):
            gradient = torch.func.grad(loss)(weights, context)
            w, g = _leaves(weights), _leaves(gradient)
            s: State = {p: {k: t if k == "step" else _leaf(t) for k, t in entries.items()} for p, entries in state.items()}
            new_weights, new_state = self.optimizer.step(w, g if self.clip is None else clip_grad_norm(g, self.clip), s, self.hyperparameters)
            outputs = [*(new_weights[k] for k in self.weight_keys), *(new_state[p][k] for p, k in self.output_state_keys)]
            sources = [*w.values(), *(s[p][k] for p, k in self.state_keys), *g.values()]
            update = _vjp(outputs, sources, cotangents)
            count = len(self.weight_keys)
            direction = {k: u for k, u in zip(self.weight_keys, update[self.count :], strict=True)}
            self.restore_rng()  # the second evaluation sees the first one's dropout masks
            tangents = (direction, {k: torch.zeros_like(t) for k, t in context.items()})
            _, (over_w, over_x) = torch.func.jvp(torch.func.grad(loss, argnums=(0, 1)), (weights, context), tangents)
        through_w = [u + over_w[k] if self.through_w else u for k, u in zip(self.weight_keys, update[:count], strict=True)]
        return [*through_w, *update[count : self.count], *(over_x[k] for k in self.context_keys)]

    def _unflatten(self, tensors: list[Tensor]) -> tuple[Params, State, Params]:
        count_w = len(self.weight_keys)
        weights = dict(zip(self.weight_keys, tensors[:count_w], strict=True))
        state: State = {}
        for (p, k), t in zip(self.state_keys, tensors[count_w : self.count], strict=True):
            state.setdefault(p, {})[k] = t
        return weights, state, dict(zip(self.context_keys, tensors[self.count :], strict=True))

    def _program_at(self, weights: Params, context: Params) -> Program:
        levels = {
            name: replace(level, params=weights if name == self.root else {k: context.get(k, t) for k, t in level.params.items()})
            for name, level in self.program.levels.items()
        }
        return Program(self.program.graph, levels)


def rematerialized(step: WindowStep) -> tuple[Hypergradient, Params, State]:
    """``step`` keeping only its inputs (or, inside a checkpointed block, not even those)."""
    outputs = _Recompute.apply(step, *step.inputs)
    step.inputs = []  # the autograd node keeps what the backward pass needs, and nothing more
    result, step.result = step.result, None  # the gradient is the caller's now: the node must not keep it
    assert result is not None  # set by the first run
    return result, *step.split(list(outputs))


def _lean_step_of(weight: Tensor) -> WindowStep | None:
    """The lean step whose output ``weight`` is (it continues that step's block), or None."""
    return getattr(weight.grad_fn, "step", None)


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(True) if t.is_floating_point() else t


def _leaves(params: Params) -> Params:
    return {k: _leaf(t) for k, t in params.items()}


def _vjp(
    outputs: list[Tensor], sources: list[Tensor], cotangents: list[Tensor | None], create_graph: bool = False
) -> list[Tensor]:
    """``sum_i c_i^T d(output_i)/d(source)`` per source (zeros where nothing reaches it)."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if c is not None and o.requires_grad]
    wanted = [t for t in sources if t.requires_grad]
    found = iter(
        torch.autograd.grad([o for o, _ in pairs], wanted, [c for _, c in pairs], allow_unused=True, create_graph=create_graph)
        if pairs and wanted
        else []
    )
    result = []
    for t in sources:
        g = next(found, None) if t.requires_grad else None
        result.append(torch.zeros_like(t) if g is None else g)
    return result


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _refuse_batch_norm(root: str, modules: nn.Module, names: set[str]) -> None:
    """BatchNorm in train mode writes running statistics in place, which forward mode cannot carry."""
    training = [
        f"{name}.{path}" if path else name
        for name in sorted(names)
        if hasattr(modules, name)
        for path, m in modules.get_submodule(name).named_modules()
        if isinstance(m, _BATCH_NORMS) and m.training
    ]
    if training:
        raise ValueError(
            f"problem {root!r}: unroll_memory='mixed' differentiates its steps in forward mode, which cannot run "
            f"BatchNorm in train mode ({training}: it writes running statistics in place); put them in eval mode "
            "(module.eval()) or use unroll_memory='remat' for this problem"
        )


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step: WindowStep, *inputs: Tensor):
        ctx.step = step
        step.context = [t.detach() for t in inputs[step.count :]]
        if step.position == 0:
            ctx.save_for_backward(*inputs)
            step.kept = [t.detach() for t in inputs[: step.count]]
        else:  # inside a block: the weights and state are recomputed from the block's first step
            ctx.save_for_backward(*inputs[step.count :])
        with torch.enable_grad():
            result, outputs = step.evaluate([t.detach() for t in inputs], differentiable=False)
        step.result = Hypergradient(result.loss.detach(), detach(result.gradient), result.infos, result.warnings)
        outputs = [o.detach() for o in outputs]
        counters = [o for o, (_, key) in zip(outputs[len(step.weight_keys) :], step.output_state_keys, strict=True) if key == "step"]
        ctx.mark_non_differentiable(*counters)  # Adam's step count carries no gradient
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *cotangents: Tensor):
        step: WindowStep = ctx.step
        saved = list(ctx.saved_tensors)
        inputs = saved if step.position == 0 else [*step.block_inputs(), *saved]
        needed = [need and t.is_floating_point() for need, t in zip(ctx.needs_input_grad[1:], inputs, strict=True)]
        create_graph = torch.is_grad_enabled()
        assert not (create_graph and step.position), "blocks are refused under unrolled readers (_setup)"
        with step.replaying():
            if step.mixed and not create_graph:
                found = step.mixed_vjp([t.detach() for t in inputs], list(cotangents))
                return (None, *(g if need else None for g, need in zip(found, needed, strict=True)))
            fresh = [
                (t.view_as(t) if create_graph else t.detach().requires_grad_(True)) if need else t.detach()
                for t, need in zip(inputs, needed, strict=True)
            ]
            _, outputs = step.evaluate(fresh, differentiable=True)
            wanted = [t for t, need in zip(fresh, needed, strict=True) if need]
            found = iter(_vjp(outputs, wanted, list(cotangents), create_graph))
        return (None, *(next(found) if need else None for need in needed))
