"""The checker's ``reference="unroll"``: reverse mode through a long run of each lower problem's own optimizer.

From the current state (weights, optimizer state, hyperparameters, current batch) every lower problem
that ``upper``'s hypergradient goes through takes ``steps`` differentiable steps of the user's own
optimizer (its pure version, :mod:`betty_like.optim`), with every step's graph kept; the upper loss is
then evaluated at the weights those steps reach and differentiated through all of them. This is
training unrolled, not an implicit formula: when the steps converge it tends to the hypergradient at
the lower solution whatever the current weights (an implicit method evaluates at the current weights,
so the two agree once the lower problem is converged). Memory grows with ``steps`` times one step's graph.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .hypergrad import HypergradInfo, Program, SolveInfo, hypergradient
from .hypergrad._tree import Params, detach, grads, norm

if TYPE_CHECKING:
    from .engine import Engine


def unrolled_hypergradient(engine: Engine, upper: str, steps: int) -> tuple[Params, dict[str, HypergradInfo]]:
    """``upper``'s hypergradient through ``steps`` steps of each lower problem's optimizer, and each run's record.

    The record is a :class:`~betty_like.hypergrad.SolveInfo` named ``"unroll"`` whose residuals are the
    relative step lengths ``||w_k+1 - w_k|| / ||w_k+1||``: ``converged`` when the last is below the
    tolerance of the weights' dtype (the run reached a fixed point of the optimizer).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"unroll_steps={steps!r} is invalid: use an integer >= 1 (e.g. 1000)")
    program = engine.program()
    below = engine.graph.responders(upper)
    nested = [n for n in below if engine.graph.lowers(n)]
    if nested:
        raise ValueError(
            f"reference='unroll' unrolls each lower problem of {upper!r} on its own, but {nested} read lower "
            "solutions themselves (middle levels, whose steps would need nested unrolls): use reference='exact'"
        )
    values = {k: t.detach().requires_grad_(True) for level in program.levels.values() for k, t in level.params.items()}
    infos = {}
    for name in below:  # response order: a lower whose loss reads another's weights sees its unrolled ones
        level = program.levels[name]
        weights, state, lengths = {k: values[k] for k in level.params}, level.optimizer.state, []
        for _ in range(steps):
            gradient = grads(level.loss({**values, **weights}), weights, create_graph=True)
            stepped, state = level.optimizer.step(weights, gradient, state)
            lengths.append(norm(detach({k: stepped[k] - weights[k] for k in weights})) / norm(detach(stepped)).clamp_min(1e-30))
            weights = stepped
        values.update(weights)
        infos[name] = HypergradInfo(name, "unroll", _record(torch.stack(lengths).tolist(), weights))
    levels = {
        name: replace(level, params={k: values[k] for k in level.params}, window=name in below, eigenvalue=None)
        for name, level in program.levels.items()
    }
    result = hypergradient(Program(program.graph, levels), upper)
    return detach(result.gradient), infos


def _record(lengths: list[float], weights: Params) -> SolveInfo:
    info = SolveInfo("unroll", iterations=len(lengths), residuals=lengths)
    tolerance = 1e-10 if next(iter(weights.values())).dtype.itemsize >= 8 else 1e-5
    last = lengths[-1]
    if not all(math.isfinite(r) for r in lengths):
        return info.finish("non_finite")
    if last <= tolerance:
        return info.finish("converged")
    if last > 1e3 * max(lengths[0], tolerance):
        return info.finish("diverged")
    return info.finish("out_of_iterations")
