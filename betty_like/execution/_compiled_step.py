"""One problem's plain step as a single captured graph: forward, backward and optimizer update.

The step is a pure function ``(params, optimizer state, learning rates, batch) -> (loss, gradients,
new params, new state)``: ``torch.func.grad_and_value`` over the problem's ``training_step`` run
with substituted parameters, then the optimizer's pure step from :mod:`betty_like.optim`, so the
update arithmetic is the same code the unrolled methods differentiate through. ``torch.compile``
captures it whole (``fullgraph=True``), which removes the per-operator Python and dispatcher cost
that dominates small models at small batches. The results are copied into the user's parameters
and optimizer state tensors in place, so the module and the optimizer stay the source of truth.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value

from .._functional import ProblemModules, call_with
from ..optim import FunctionalOptimizer, Params, clip_grad_norm

# On CPU the C++ wrapper calls the generated kernels without a Python frame per kernel; measured on
# the 46K-parameter GPT-like model at batch 1 it takes a step from 0.71 ms to 0.51 ms.
_CPU_OPTIONS: dict[str, Any] = {"fullgraph": True, "dynamic": False, "options": {"cpp_wrapper": True}}
# On CUDA, CUDA graphs replay the whole step with one launch (not measured here: no GPU).
_CUDA_OPTIONS: dict[str, Any] = {"fullgraph": True, "dynamic": False, "mode": "reduce-overhead"}


def own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own.

    Dynamo keeps its cache, and its limit of recompilations, per code object. Every captured step is
    the same closure code, so without this the steps of different problems (and engines) would share
    one cache and soon exhaust its limit, after which dynamo silently runs the function uncompiled.
    """
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def compile_options(device_type: str) -> dict[str, Any]:
    """``torch.compile`` options for a captured graph on a device of this type."""
    return _CUDA_OPTIONS if device_type == "cuda" else _CPU_OPTIONS


class CapturedStep:
    """The compiled whole step of one problem, bound to its parameters and optimizer state tensors.

    Build it after the problem has taken one eager step: the user's optimizer has then created its
    state in torch's own format (which the captured step reads and writes in place), and the eager
    gradients say which parameters the loss reaches (``torch.func`` would give the others a zero
    gradient, which is not a no-op under momentum or weight decay; torch skips them).

    Args:
        owner: the problem's name, for messages.
        training_step: the problem's loss function of a batch.
        modules: every problem's module, so that ``training_step`` runs with substituted parameters.
        leaves: the problem's parameters, keyed ``"<problem>.<param>"``.
        functional: the pure view of the problem's optimizer.
        grad_clip: global gradient-norm bound, or ``None``.
    """

    def __init__(
        self,
        owner: str,
        training_step: Callable[[Any], Tensor],
        modules: ProblemModules,
        leaves: Params,
        functional: FunctionalOptimizer,
        grad_clip: float | None,
    ) -> None:
        optimizer = functional.optimizer
        trained = {k: t for k, t in leaves.items() if t.grad is not None}
        self.owner = owner
        self.names = list(trained)
        self.params = list(trained.values())
        self.optimizer_state = optimizer.state  # load_state_dict replaces it: then this capture is stale
        self.state_keys: list[tuple[str, str]] = []
        self.state_tensors: list[Tensor] = []
        for name, p in trained.items():
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    self.state_keys.append((name, key))
                    self.state_tensors.append(value)
        self._targets = self.params + self.state_tensors
        self.device = self.params[0].device
        self._groups = [g for g in optimizer.param_groups if any(p.grad is not None for p in g["params"])]
        self._lr_values = [float(g["lr"]) for g in self._groups]
        self.lrs = [torch.tensor(lr, dtype=self.params[0].dtype, device=self.device) for lr in self._lr_values]
        self.group_hyperparameters = [self._static(functional, g) for g in self._groups]
        group_of = {
            functional.names[id(p)]: i for i, g in enumerate(self._groups) for p in g["params"] if p.grad is not None
        }
        names, state_keys = self.names, self.state_keys

        def step(params: list[Tensor], state: list[Tensor], lrs: list[Tensor], context: Params, batch: Any):
            w = dict(zip(names, params, strict=True))
            by_name: dict[str, dict[str, Tensor]] = {n: {} for n in names}
            for (name, key), t in zip(state_keys, state, strict=True):
                by_name[name][key] = t
            hps = {n: {**self.group_hyperparameters[group_of[n]], "lr": lrs[group_of[n]]} for n in names}

            def loss_of(w: Params) -> tuple[Tensor, dict[str, Any]]:
                return loss_and_metrics(call_with(modules, {**context, **w}, training_step, batch))

            grads, (loss, metrics) = grad_and_value(loss_of, has_aux=True)(w)
            applied = grads if grad_clip is None else clip_grad_norm(grads, grad_clip)
            new_w, new_state = functional.step(w, applied, by_name, hps)
            results = [new_w[n] for n in names] + [new_state[n][k] for n, k in state_keys]
            gradient = [grads[n] for n in names]
            return loss, gradient, results, metrics, finiteness_summary(loss, gradient)

        self._compiled = torch.compile(own_code(step), **compile_options(self.device.type))

    @staticmethod
    def _static(functional: FunctionalOptimizer, group: dict[str, Any]) -> dict[str, object]:
        """A group's hyperparameters but the learning rate: constants of the graph (a change recompiles)."""
        return {k: v for k, v in functional.rule.hyperparameters(group).items() if k != "lr"}

    def refresh(self, functional: FunctionalOptimizer) -> None:
        """Carry the live learning rates into the graph's inputs, and any other changed hyperparameter."""
        for i, group in enumerate(self._groups):
            lr = float(group["lr"])
            if lr != self._lr_values[i]:
                self._lr_values[i] = lr
                self.lrs[i].fill_(lr)
            static = self._static(functional, group)
            if static != self.group_hyperparameters[i]:
                self.group_hyperparameters[i] = static

    def __call__(self, batch: Any, context: Params) -> tuple[Tensor, Params, Callable[[], None], dict[str, Any], Tensor]:
        """Run the captured step: ``(loss, gradients, commit, metrics, summary)``; ``commit()`` writes the update in place.

        Nothing is written until ``commit`` is called, so a non-finite loss can skip the step. ``metrics``
        are the other entries of a ``training_step`` that returns a dict; ``summary`` is
        :func:`finiteness_summary` of the loss and gradients, computed inside the graph.
        """
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            loss, grads, results, metrics, summary = self._compiled(self.params, self.state_tensors, self.lrs, context, batch)
        if self.device.type == "cuda":
            grads = [g.clone() for g in grads]  # the next replay overwrites the graph's output buffers

        def commit() -> None:
            with torch.no_grad():
                torch._foreach_copy_(self._targets, results)

        return loss, dict(zip(self.names, grads, strict=True)), commit, metrics, summary


def finiteness_summary(loss: Tensor, gradient: list[Tensor]) -> Tensor:
    """The loss followed by each gradient tensor's norm, in one 1-D tensor: what the engine's non-finite check reads.

    A norm is NaN/inf if any entry is (or if finite entries overflow it, which the check then looks at
    entry by entry). Inside a captured step these kernels fuse into the graph, so the check costs the
    step one host read and no extra dispatches; eager steps compute the same with one fused
    ``_foreach_norm`` (:func:`betty_like._guards.summary_of`). That function is not reused here:
    inductor has no C++ kernel for ``_foreach_norm`` (it falls back to a proxy call), and in torch 2.13
    the captured step with that fallback under the C++ wrapper crashed the process (a segmentation
    fault at the first replay of the ridge step in ``benchmarks/engine_overhead.py``); per-tensor
    ``vector_norm`` compiles to inductor's own kernels.
    """
    return torch.stack([loss.detach(), *(torch.linalg.vector_norm(g.detach()) for g in gradient)])


def loss_and_metrics(out: Any) -> tuple[Tensor, dict[str, Any]]:
    """A ``training_step`` result as (0-d loss, other scalars): a tensor, or a dict with ``"loss"``.

    The first step of a problem runs eager, where a dict without ``"loss"`` or a non-tensor loss is
    already an error naming the problem, so the captured step sees only well-formed results.
    """
    if isinstance(out, Mapping):
        return out["loss"].reshape(()), {k: v for k, v in out.items() if k != "loss"}
    return out.reshape(()), {}
