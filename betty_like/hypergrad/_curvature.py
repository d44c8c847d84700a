"""The curvature of an implicit method's linear system: the Hessian, or its Gauss-Newton part.

With ``ProblemConfig(curvature="gauss_newton")`` the Hessian ``H`` of the lower objective is replaced
by the generalised Gauss-Newton matrix ``G = J^T H_out J``: ``J`` the Jacobian of the model's outputs
in its parameters, ``H_out`` the Hessian of the output loss. ``G`` is positive semi-definite whenever
the output loss is convex in the outputs (cross-entropy, squared error), so conjugate gradient never
meets negative curvature, at the price of dropping the term of ``H`` weighted by the loss's gradient
(zero where the model fits its data exactly). Only the system's matrix changes; the push through
``d grad_w f / dx`` stays exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._context import HypergradContext
from ._linsolve import GraphMatVec
from ._tree import Params, grads

Split = tuple[Tensor, Callable[[Tensor], Tensor]]


def split_objective(ctx: HypergradContext) -> Split:
    """``(outputs, loss_fn)`` of the lower objective at ``ctx.w``, ``ctx.x``, checked."""
    if ctx.outputs is None:
        raise ValueError(
            f"problem {ctx.owner!r} uses curvature={ctx.config.curvature!r} with hypergrad={ctx.config.hypergrad!r}, "
            "which needs its loss split into model outputs and a loss of those outputs: define "
            "output_loss(self, batch) returning (outputs, loss_fn) with loss_fn(outputs) == training_step(batch)"
        )
    split = ctx.outputs(ctx.w, ctx.x)
    if not (isinstance(split, tuple) and len(split) == 2 and isinstance(split[0], Tensor) and callable(split[1])):
        raise TypeError(
            f"problem {ctx.owner!r}: output_loss must return a pair (outputs tensor, loss_fn of outputs), got "
            f"{type(split).__name__}; e.g. return logits, lambda z: F.cross_entropy(z, y)"
        )
    if not split[0].requires_grad:
        raise ValueError(
            f"problem {ctx.owner!r}: the outputs returned by output_loss depend on none of its parameters; "
            "return the model's outputs (e.g. self.module(x)), not a detached tensor"
        )
    return split


def gauss_newton(ctx: HypergradContext) -> GraphMatVec:
    """``u -> J^T H_out J u`` at ``ctx.w``: three reverse passes, never a Jacobian.

    ``J u`` is the derivative in ``d`` of the (linear) ``J^T d``, so one graph of ``J^T d`` built here
    serves every product; ``H_out (J u)`` is a Hessian-vector product of the output loss alone.
    """
    outputs, loss_fn = split_objective(ctx)
    (output_gradient,) = torch.autograd.grad(loss_fn(outputs), outputs, create_graph=True)
    dummy = torch.zeros_like(outputs, requires_grad=True)
    transposed = grads(outputs, ctx.w, grad_outputs=dummy, create_graph=True)
    reached = [k for k, t in transposed.items() if t.requires_grad]

    def product(u: Params, create_graph: bool) -> Params:
        if not reached:
            return {k: torch.zeros_like(t) for k, t in u.items()}
        (ju,) = torch.autograd.grad(
            [transposed[k] for k in reached], dummy, grad_outputs=[u[k] for k in reached],
            retain_graph=True, create_graph=create_graph,
        )
        if output_gradient.requires_grad:
            (hju,) = torch.autograd.grad(
                output_gradient, outputs, grad_outputs=ju, retain_graph=True, create_graph=create_graph
            )
        else:  # a loss linear in the outputs has no curvature
            hju = torch.zeros_like(ju)
        return grads(outputs, ctx.w, grad_outputs=hju, retain_graph=True, create_graph=create_graph)

    return product


def curvature(ctx: HypergradContext) -> GraphMatVec | None:
    """The products replacing the Hessian in the system: ``None`` keeps the Hessian itself."""
    return gauss_newton(ctx) if ctx.config.curvature == "gauss_newton" else None
