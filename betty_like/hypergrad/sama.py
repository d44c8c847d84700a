"""SAMA: the finite-difference hypergradient with the lower optimizer's own adaptation.

An optimizer's update responds to its gradient through a diagonal: for Adam/AdamW
``lr * (1 - beta1) / (1 - beta1^t) / (sqrt(v_hat) + eps)`` (second moment held fixed), for SGD the
identity times the learning rate. SAMA scales ``v`` by that diagonal instead of DARTS' scalar,
then takes the same central difference, so the approximate inverse Hessian follows the optimizer
actually used.
"""

from __future__ import annotations

import torch

from ._context import HypergradContext, HypergradInfo
from ._method import Method
from ._tree import Params
from .darts import finite_difference_push, learning_rate_scale

_ADAM_CLASSES = (torch.optim.Adam, torch.optim.AdamW)


def adam_preconditioner(ctx: HypergradContext) -> Params:
    """Elementwise derivative of the Adam update with respect to the gradient, per parameter."""
    hyperparameters = ctx.optimizer.hyperparameters()
    out = {}
    for name, w in ctx.w.items():
        state = ctx.optimizer.state.get(name)
        if not state or "exp_avg_sq" not in state:
            raise RuntimeError(
                f"sama for problem {ctx.owner!r} needs Adam's moment estimates for {name!r}, but the optimizer has "
                "not stepped that parameter yet: let the lower problem take at least one step first (warmup_steps)."
            )
        hp = hyperparameters[name]
        beta1, beta2 = hp["betas"]
        count = float(state["step"])
        second = state["exp_avg_sq"] / (1 - beta2**count)
        out[name] = (hp["lr"] * (1 - beta1) / (1 - beta1**count) / (second.sqrt() + hp["eps"])).to(w.dtype)
    return out


def push(ctx: HypergradContext) -> tuple[Params, HypergradInfo]:
    # SGD's adaptation is the identity: its update responds to the gradient through lr alone
    scale = adam_preconditioner(ctx) if type(ctx.optimizer.optimizer) in _ADAM_CLASSES else learning_rate_scale(ctx)
    return finite_difference_push(ctx, scale, "sama")


METHOD = Method(
    "sama",
    "finite differences preconditioned by the lower optimizer's adaptation (Adam's moments; lr for SGD)",
    push,
    second_order=False,
    optimizers=(torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW),
)
