"""Arithmetic on parameter dicts (``dict[str, Tensor]``), the vectors every solver works on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Params = dict[str, Tensor]


def dot(a: Params, b: Params) -> Tensor:
    """Inner product summed over all entries, accumulated in at least float32."""
    total = None
    for k in a:
        term = torch.sum(a[k].to(_accumulation_dtype(a[k])) * b[k].to(_accumulation_dtype(a[k])))
        total = term if total is None else total + term
    return total


def norm(a: Params) -> Tensor:
    return dot(a, a).sqrt()


def axpy(alpha: Tensor | float, x: Params, y: Params) -> Params:
    """``y + alpha * x``."""
    return {k: y[k] + alpha * x[k] for k in y}


def scale(alpha: Tensor | float, x: Params) -> Params:
    return {k: alpha * v for k, v in x.items()}


def zeros_like(x: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in x.items()}


def aliases(x: Params) -> Params:
    """A view of each tensor: derivatives reaching a view are summed there before they reach the tensor.

    Micro-batches (``accumulate_steps``) give each shard its own views of one view in common, so that
    each shard's terms are summed first and the shards' then, before they reach the tensor: the order
    of a rank's sum followed by data parallel's average over ranks.
    """
    return {k: t.view_as(t) for k, t in x.items()}


def detach(x: Params) -> Params:
    return {k: v.detach() for k, v in x.items()}


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def grads(outputs: Sequence[Tensor] | Tensor, inputs: Params, grad_outputs=None, **kwargs) -> Params:
    """``torch.autograd.grad`` keyed like ``inputs``; inputs the outputs do not reach get zeros."""
    names = list(inputs)
    result = torch.autograd.grad(
        outputs, [inputs[n] for n in names], grad_outputs=grad_outputs, allow_unused=True, **kwargs
    )
    return {n: torch.zeros_like(inputs[n]) if g is None else g for n, g in zip(names, result, strict=False)}
