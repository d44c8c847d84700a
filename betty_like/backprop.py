"""Reverse traversal of the problem graph: an upper problem's hypergradient.

For an upper problem ``U`` with parameters ``lam``, every problem reachable from ``U`` by ``u2l``
edges has a solution that depends on ``lam``. The traversal

1. evaluates ``U``'s loss at everyone's current parameters and takes its gradient with respect to
   the leaf parameters of ``U`` and of all those problems (reverse mode also runs through any
   unrolled steps, so ``unroll`` and ``first_order`` need nothing more);
2. visits the problems below ``U`` lowest first; for each one whose method pushes (implicit or
   finite-difference), it pushes the accumulated vector ``v = dF/dw`` through the problem's best
   response with :data:`~betty_like.hypergrad.METHODS` and adds the result to its upper
   problems' vectors.

Only vector-Jacobian products are formed, never a Jacobian: the cost is a few gradient or
Hessian-vector products per level, at any depth.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .hypergrad import HypergradContext, HypergradInfo, Method
from .hypergrad._tree import grads

if TYPE_CHECKING:
    from .config import ProblemConfig
    from .engine import Engine
    from .optim import Params


def hypergradient(
    engine: Engine,
    upper: str,
    methods: Mapping[str, Method] | None = None,
    configs: Mapping[str, ProblemConfig] | None = None,
    detach_windows: bool = False,
) -> tuple[Tensor, Params, dict[str, HypergradInfo]]:
    """``(loss, dF/dlam, per-problem diagnostics)`` for problem ``upper`` at the engine's current state.

    ``methods`` / ``configs`` override the method or config of problems below ``upper`` (used by
    :func:`~betty_like.check.check_hypergradient`). With ``detach_windows`` every parameter is taken
    as a fresh leaf at its current value, so open unrolled windows are ignored.
    """
    methods = methods or {}
    configs = configs or {}
    graph = engine.graph
    below = graph.descendants(upper)
    scope = [n for n in graph.order if n in below]
    current = engine.current_params()
    if detach_windows:
        current = {k: v.detach().requires_grad_(True) for k, v in current.items()}

    def leaves_of(name: str) -> Params:
        return {k: current[k] for k in engine.leaves(name)} if detach_windows else engine.leaves(name)

    leaves: Params = {}
    for name in [upper, *scope]:
        leaves.update(leaves_of(name))
    loss = engine.loss(upper, engine.batch(upper), current)
    adjoint = grads(loss, leaves, retain_graph=True)
    infos: dict[str, HypergradInfo] = {}
    for name in reversed(scope):
        state = engine.state_of(name)
        method = methods.get(name, state.method)
        v = {k: adjoint.pop(k) for k in engine.leaves(name)}
        if method.unrolled:
            if not detach_windows:
                if state.fast is None and state.steps > state.problem.config.warmup_steps and _nonzero(v):
                    engine._warn_once(
                        f"closed-window:{name}:{upper}",
                        f"problem {upper!r} reads {name!r}, whose unrolled steps were already consumed (and written "
                        f"back) by another upper problem, so {upper!r} gets no gradient through {name!r}; give "
                        f"{name!r} an implicit method (cg, neumann, fixed_point) to serve several upper problems",
                    )
                continue  # gradients already flowed through the unrolled steps; v is the window start's
            raise ValueError(
                f"problem {name!r}: {method.name!r} has no push; compare an implicit or finite-difference method"
            )
        if not _nonzero(v):
            continue
        upper_keys = [k for m in graph.uppers(name) if m == upper or m in below for k in engine.leaves(m)]
        lam_current = {k: current[k] for k in upper_keys}
        fixed = {k: t.detach() for k, t in current.items()}
        batch = engine.batch(name)

        def inner_loss(w: Params, lam: Params, name: str = name, batch=batch, fixed=fixed) -> Tensor:
            return engine.loss(name, batch, {**fixed, **w, **lam})

        state.functional.reload_state()
        ctx = HypergradContext(
            inner_loss=inner_loss,
            w={k: current[k].detach() for k in engine.leaves(name)},
            lam={k: t.detach() for k, t in lam_current.items()},
            v=v,
            config=configs.get(name, state.problem.config),
            optimizer=state.functional,
        )
        with torch.enable_grad():
            pushed, infos[name] = method.push(ctx)
        outputs = list(lam_current.values())
        contributions = grads(
            outputs, leaves, grad_outputs=[pushed[k] for k in lam_current], retain_graph=True
        )
        for k, g in contributions.items():
            if k in adjoint:
                adjoint[k] = adjoint[k] + g
    return loss, {k: adjoint[k] for k in engine.leaves(upper)}, infos


def _nonzero(vector: Params) -> bool:
    return any(bool(t.any()) for t in vector.values())
