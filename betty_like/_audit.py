"""What a loss must read and must not do, checked where the user's ``training_step`` runs.

Two mistakes give no error of their own and a wrong run:

* A loss that reads a problem no edge connects it to (an upper whose loss reads a lower's module, with
  the edges left out) is differentiated with that problem's parameters held fixed: no gradient flows
  between them, and an upper whose loss depends on nothing else never moves.
* A lower loss that ignores an upper problem named by a ``u2l`` edge makes that upper's
  hypergradient through it identically zero, forever.

Both show in the autograd graph of the problem's first loss, read once per problem: a walk from the
loss that stops at every problem's parameters (so a window's or a best response's own graph, which
legitimately reaches other problems, is not mistaken for a read). No extra forward, backward or host
sync, and nothing at later steps.

A ``training_step`` that calls ``loss.backward()`` or ``optimizer.step()`` fails with a raw autograd
error (a freed graph) or silently steps twice; both are named here instead. ``optimizer.step()`` of any
problem's optimizer is refused at every call, before it changes anything.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .graph import Graph

_ATTEMPTS = 3  # evaluations in which an upper's parameters may be detached before the u2l check gives up


class LossAudit:
    """Checks the first evaluation of each problem's loss against the graph, and every call against misuse."""

    def __init__(self, graph: Graph, setups: Mapping[str, Any], warn_once: Callable[[str, str], None]) -> None:
        self.expected = {n: [u for u in graph.names if n in graph.u2l[u]] for n in graph.names}
        self.allowed = {n: {n, *self.expected[n], *graph.reads(n)} for n in graph.names}
        self.leaves = {name: list(setup.leaves.items()) for name, setup in setups.items()}
        self.attempts = dict.fromkeys(graph.names, 0)
        self.warn_once = warn_once
        self._calls: list[tuple[str, Mapping[str, Tensor] | None]] = []  # evaluations under way, innermost last
        self._hooks: list[list[Any]] = []  # the backward watch of each of them
        # one step pre-hook per problem optimizer for the engine's life (registering one per evaluation costs
        # several µs at every loss); it holds the audit weakly and refuses only while an evaluation runs
        owners = {id(setup.problem.optimizer): (name, setup.problem.optimizer) for name, setup in setups.items()}
        audit = weakref.ref(self)
        handles = [optimizer.register_step_pre_hook(partial(_stepped, audit, owner)) for owner, optimizer in owners.values()]
        weakref.finalize(self, _remove, handles)

    def call(self, name: str, values: Mapping[str, Tensor] | None) -> LossAudit:
        """``with audit.call(name, values) as check``: around one evaluation of ``name``'s ``training_step``.

        ``check(loss)`` checks the loss it returns. A plain context manager on ``self`` (evaluations nest,
        so it keeps a stack): a generator-based one costs several µs at every loss.
        """
        self._calls.append((name, values))
        return self

    def __enter__(self) -> Callable[[Tensor], Tensor]:
        name, values = self._calls[-1]
        accumulated: list[str] = []
        audited = self.attempts[name] < _ATTEMPTS and torch.is_grad_enabled()
        self._hooks.append(self._watch_backward(values, accumulated) if audited else [])
        return partial(self._check, name, values, accumulated, audited)

    def __exit__(self, *_: object) -> None:
        self._calls.pop()
        for hook in self._hooks.pop():
            hook.remove()

    def evaluating(self) -> str | None:
        """The problem whose ``training_step`` runs now (the innermost), or ``None``."""
        return self._calls[-1][0] if self._calls else None

    def _watch_backward(self, values: Mapping[str, Tensor] | None, accumulated: list[str]) -> list[Any]:
        """Hooks on every leaf the loss could reach that note a ``.grad`` accumulation (``backward()``, not ``grad``)."""
        tensors = [t for leaves in self.leaves.values() for _, t in leaves]
        tensors += [t for t in (values or {}).values() if t.is_leaf and t.requires_grad]
        unique = {id(t): t for t in tensors if t.requires_grad}
        return [t.register_post_accumulate_grad_hook(lambda _, k=k: accumulated.append(k)) for k, t in unique.items()]

    def _check(
        self, name: str, values: Mapping[str, Tensor] | None, accumulated: list[str], audited: bool, loss: Tensor
    ) -> Tensor:
        if accumulated:
            raise RuntimeError(
                f"problem {name!r}: its training_step called backward() (parameter .grad was accumulated); the "
                "engine differentiates the loss training_step returns itself, with the hypergradient method of "
                "each problem. Remove loss.backward() (and any optimizer.step()) from training_step and return the loss"
            )
        if not audited:
            return loss
        self.attempts[name] += 1
        if loss.grad_fn is None:
            return loss
        leaves, nodes, present = self._owners(values)
        found = _reached(loss, leaves, nodes)
        unconnected = sorted(found - self.allowed[name])
        if unconnected:
            raise ValueError(_unconnected_message(name, unconnected))
        undecided = [u for u in self.expected[name] if u not in present]
        for upper in self.expected[name]:
            if upper in present and upper not in found:
                self.warn_once(f"ignores:{name}:{upper}", _ignored_message(name, upper))
        if not undecided:
            self.attempts[name] = _ATTEMPTS
        return loss

    def _owners(self, values: Mapping[str, Tensor] | None) -> tuple[dict[int, str], dict[Any, str], set[str]]:
        """Which problem each tensor the loss may read belongs to: leaves by id, computed values by grad_fn."""
        substituted = values or {}
        leaves: dict[int, str] = {}
        nodes: dict[Any, str] = {}
        present: set[str] = set()
        for owner, items in self.leaves.items():
            for key, t in items:
                if key not in substituted:
                    leaves[id(t)] = owner
                    present.add(owner)
        for key, t in substituted.items():
            if not t.requires_grad:
                continue
            owner = key.split(".", 1)[0]
            present.add(owner)
            if t.grad_fn is None:
                leaves[id(t)] = owner
            else:
                nodes[t.grad_fn] = owner  # the node object is kept alive here, so its identity is stable
        return leaves, nodes, present


def _stepped(audit: Callable[[], LossAudit | None], owner: str, optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """Step pre-hook of problem ``owner``'s optimizer: refuses ``step()`` called from inside a ``training_step``."""
    evaluating = audit()
    name = evaluating.evaluating() if evaluating is not None else None
    if name is None:
        return
    whose = "its own optimizer" if owner == name else f"the optimizer of problem {owner!r}"
    raise RuntimeError(
        f"problem {name!r}: its training_step called {whose}'s step() ({type(optimizer).__name__}); the engine "
        "takes every optimizer step itself, from the gradient (or hypergradient) of the loss training_step "
        "returns. Remove loss.backward(), optimizer.zero_grad() and optimizer.step() from training_step and "
        "return the loss"
    )


def _remove(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


def _reached(loss: Tensor, leaves: Mapping[int, str], nodes: Mapping[Any, str]) -> set[str]:
    """Problems whose parameters ``loss`` reads directly: the walk stops at the first tensor of a problem."""
    found: set[str] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        owner = nodes.get(node)
        if owner is None and hasattr(node, "variable"):  # AccumulateGrad: the node of a leaf tensor
            owner = leaves.get(id(node.variable))
        if owner is not None:
            found.add(owner)
            continue
        stack.extend(following for following, _ in node.next_functions)
    return found


def _unconnected_message(name: str, others: list[str]) -> str:
    other = others[0]
    return (
        f"problem {name!r}: its training_step reads the parameters of {others}, but no edge connects "
        f"{name!r} to {'them' if len(others) > 1 else 'it'}, so they are held fixed and no gradient flows between "
        f"the problems (an upper whose loss reads only a lower never moves). Fix, for {other!r}: if {name!r}'s "
        f"loss reads {other!r}'s solution (it is a lower level of {name!r}), add 'l2u': {{{other!r}: [{name!r}]}} "
        f"(and 'u2l': {{{name!r}: [{other!r}]}} when {name!r}'s parameters appear in {other!r}'s loss); if "
        f"{other!r}'s parameters are hyperparameters of {name!r}'s loss, add 'u2l': {{{other!r}: [{name!r}]}}; to "
        f"read {other!r} as a constant, detach what you read from it (.detach() or torch.no_grad())"
    )


def _ignored_message(name: str, upper: str) -> str:
    return (
        f"problem {name!r}: its training_step does not depend on the parameters of {upper!r}, although the u2l "
        f"edge {upper!r} -> {name!r} says they appear in its loss: {upper!r}'s hypergradient through {name!r} is "
        f"identically zero, so {upper!r} learns nothing from it. Use {upper!r} in {name!r}'s loss without "
        f"detaching it (e.g. self.{upper}(...)), or remove the edge"
    )
