"""Finite-difference hypergradient (DARTS): inverse Hessian replaced by the learning rate.

With ``H^-1 ~ lr * I`` (one gradient step) the second-order term is the mixed derivative
``-lr * d/dlam <grad_w f, v>``, estimated by central differences of ``grad_lam f`` at
``w +- eps * v`` with ``eps = fd_epsilon / ||v||``. Only first derivatives are taken, so it works
where double backward does not; it is biased by design.
"""

from __future__ import annotations

import torch

from ._context import HypergradContext, HypergradInfo
from ._tree import Params, axpy, grads, norm, zeros_like


def central_difference(ctx: HypergradContext, direction: Params) -> Params:
    """``d/dlam <grad_w f(w, lam), direction>`` by central differences, without touching live weights."""
    size = float(norm(direction))
    if size == 0.0:
        return zeros_like(ctx.lam)
    eps = ctx.config.fd_epsilon / size
    lam = {k: t.detach().requires_grad_(True) for k, t in ctx.lam.items()}
    with torch.enable_grad():
        plus = grads(ctx.inner_loss(axpy(eps, direction, ctx.w), lam), lam)
        minus = grads(ctx.inner_loss(axpy(-eps, direction, ctx.w), lam), lam)
    return {k: (plus[k] - minus[k]) / (2 * eps) for k in lam}


def hypergrad(ctx: HypergradContext) -> tuple[Params, HypergradInfo]:
    lr = ctx.optimizer.learning_rate()
    mixed = central_difference(ctx, ctx.v)
    return {k: -lr * g for k, g in mixed.items()}, HypergradInfo("darts")
