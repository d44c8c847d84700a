"""Finite-difference hypergradient (DARTS): the inverse Hessian replaced by a diagonal scale.

With ``H^-1 ~ S`` the second-order term is the mixed derivative ``-d/dx <grad_w f, S v>``,
estimated by central differences of ``grad_x f`` at ``w +- eps * S v`` with
``eps = fd_epsilon / ||S v||``. ``S`` is each parameter's own group learning rate
(``darts_scale="lr"``, the DARTS paper's xi: one gradient step) or the identity
(``darts_scale="identity"``, Betty's ``darts``). Only first derivatives are taken, so it works where
double backward does not; it is biased by design.
"""

from __future__ import annotations

import torch

from ._context import HypergradContext, HypergradInfo
from ._method import Method
from ._tree import Params, axpy, detach, grads, norm, zeros_like


def central_difference(ctx: HypergradContext, direction: Params) -> Params:
    """``d/dx <grad_w f(w, x), direction>`` by central differences, without touching live weights."""
    size = float(norm(direction))
    if size == 0.0:
        return zeros_like(ctx.x)
    eps = ctx.config.fd_epsilon / size
    w = detach(ctx.w)
    x = {k: t.detach().requires_grad_(True) for k, t in ctx.x.items()}
    with torch.enable_grad():
        plus = grads(ctx.objective(axpy(eps, direction, w), x), x)
        minus = grads(ctx.objective(axpy(-eps, direction, w), x), x)
    return {k: (plus[k] - minus[k]) / (2 * eps) for k in x}


def finite_difference_push(ctx: HypergradContext, scale: Params, method: str) -> tuple[Params, HypergradInfo]:
    """``-d/dx <grad_w f, scale * v>``: the push with ``H^-1`` replaced by ``diag(scale)``."""
    direction = {k: scale[k] * ctx.v[k] for k in ctx.v}
    mixed = central_difference(ctx, direction)
    return {k: -g for k, g in mixed.items()}, HypergradInfo(ctx.owner, method)


def learning_rate_scale(ctx: HypergradContext) -> Params:
    """Each parameter's own group learning rate, shaped like it: one gradient step's ``H^-1``."""
    rates = ctx.optimizer.learning_rates()
    return {k: torch.full_like(v, rates[k]) for k, v in ctx.v.items()}


def push(ctx: HypergradContext) -> tuple[Params, HypergradInfo]:
    if ctx.config.darts_scale == "identity":
        scale = {k: torch.ones_like(v) for k, v in ctx.v.items()}
    else:
        scale = learning_rate_scale(ctx)
    return finite_difference_push(ctx, scale, "darts")


METHOD = Method(
    "darts",
    "finite-difference approximation, inverse Hessian replaced by the learning rate (or identity)",
    push,
    second_order=False,
)
