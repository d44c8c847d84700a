"""SAMA: the finite-difference hypergradient with Adam's preconditioner.

The lower problem's Adam update ``lr * m_hat / (sqrt(v_hat) + eps)`` responds to its gradient
through the diagonal ``lr * (1 - beta1) / (1 - beta1^t) / (sqrt(v_hat) + eps)`` (second moment held
fixed). SAMA scales ``v`` by that diagonal instead of DARTS' scalar learning rate, then takes the
same central difference, so the approximate inverse Hessian follows the optimizer actually used.
"""

from __future__ import annotations

import torch

from ._context import HypergradContext, HypergradInfo
from ._tree import Params
from .darts import central_difference

_ADAM_CLASSES = (torch.optim.Adam, torch.optim.AdamW)


def adam_preconditioner(ctx: HypergradContext) -> Params:
    """Elementwise derivative of the Adam update with respect to the gradient, per parameter."""
    optimizer = ctx.optimizer.optimizer
    if type(optimizer) not in _ADAM_CLASSES:
        raise TypeError(
            f"sama needs an Adam or AdamW lower optimizer, got {type(optimizer).__name__}: "
            "use hypergrad='darts' for other optimizers."
        )
    hyperparameters = ctx.optimizer.hyperparameters()
    out = {}
    for name, w in ctx.w.items():
        state = ctx.optimizer.state.get(name)
        if not state or "exp_avg_sq" not in state:
            raise RuntimeError(
                f"sama needs Adam's moment estimates for {name!r}, but the optimizer has not stepped "
                "that parameter yet: let the lower problem take at least one step first (warmup_steps)."
            )
        hp = hyperparameters[name]
        beta1, beta2 = hp["betas"]
        count = float(state["step"])
        second = state["exp_avg_sq"] / (1 - beta2**count)
        out[name] = hp["lr"] * (1 - beta1) / (1 - beta1**count) / (second.sqrt() + hp["eps"]).to(w.dtype)
    return out


def hypergrad(ctx: HypergradContext) -> tuple[Params, HypergradInfo]:
    preconditioner = adam_preconditioner(ctx)
    direction = {k: preconditioner[k] * ctx.v[k] for k in ctx.v}
    mixed = central_difference(ctx, direction)
    return {k: -g for k, g in mixed.items()}, HypergradInfo("sama")
