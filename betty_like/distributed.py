"""Data parallel with exact hypergradients: N processes give the one-process result on the same global batch.

PyTorch's DDP wrapper reduces ``.grad`` in ``backward()`` hooks: it never sees ``autograd.grad``
results and refuses ``create_graph=True``, so it cannot carry a hypergradient. Here every reduction is
explicit and the arithmetic is that of one process:

- each global batch is split by rank (``tensor_split`` along dim 0, no padding duplicates), and every
  loss is multiplied by its shard's share ``n_rank / n_global``, so the *sum* over ranks of every
  loss is its global value (the same shards, all of them in one process, are
  ``ProblemConfig(accumulate_steps=n)``: :func:`~._data.split_batch`);
- every loss reads its parameters through :meth:`DataParallel.averaged`: the identity, whose backward
  averages the derivative reaching them over ranks (one flat all-reduce per problem it reaches, per
  backward through an evaluation). Every derivative beyond a loss, of any order and through any
  number of evaluations (unrolled windows, finite differences, nested solves), is then the same on
  every rank: its global value divided by the world size. With two ranks that division and every sum
  of the halves below are exact, so the result equals, bit for bit, one process whose micro-batches
  meet in one view before each parameter (see ``Engine._accumulated``);
- a step's gradient is summed over ranks (its loss too, for the record), an unrolled step's by a
  differentiable all-reduce; a push sums the vector it is given, every Hessian-vector product of its
  solve (through the traversal's ``matvec_wrap``: compiled and Gauss-Newton products are each rank's
  own) and the pushed vector, so every rank solves the same system and stops at the same iteration;
  the pushed vector enters each rank's gradient divided by the world size.

Betty's scheme (each rank solves its own system with its local gradient, results averaged) is 30 %
to 510 % off on the digits MLP (issue 18). BatchNorm keeps per-rank statistics (SyncBatchNorm has no
double backward). Multi-node runs are torchrun's (``--nnodes``, ``--rdzv-endpoint``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._data import split_batch
from .hypergrad._linsolve import MatVec
from .hypergrad._tree import Params


class _AllReduce(torch.autograd.Function):
    """Sum over ranks; its vector-Jacobian product is the same sum."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _AllReduce.apply(grad)


class _FlatSum(torch.autograd.Function):
    """A sum over ranks of several tensors in one flat buffer; its vector-Jacobian product is the same sum."""

    @staticmethod
    def forward(ctx, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(_flat_sum(list(tensors)))

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, ...]:
        return _FlatSum.apply(*grads)


class _Averaged(torch.autograd.Function):
    """The identity on replicated tensors of one problem read by this rank's loss; a derivative reaching
    them is averaged over ranks (one flat all-reduce), so every rank holds the same value.

    Averaged, not summed, so that each rank's part still sums over ranks to the global derivative and
    the reductions downstream stay as they are. With two ranks every step is exact (halving and adding
    two halves round nothing), which makes the result equal bit for bit to one process whose
    micro-batches meet in one view before the tensor (``Engine._accumulated``): both sum the shards'
    terms of each evaluation first, then the evaluations. Without it a derivative taken through an
    unrolled window added each rank's terms at each step and the ranks' only at the end, and darts
    differenced each rank's gradients before the sum: other roundings.
    """

    @staticmethod
    def forward(ctx, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.world = dist.get_world_size()
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, ...]:
        # autograd hands zeros for outputs the derivative does not reach (materialized gradients), so every
        # rank all-reduces the same tensors
        return tuple(g / ctx.world for g in _FlatSum.apply(*grads))


def _flat_sum(tensors: list[Tensor]) -> list[Tensor]:
    """One all-reduce for a list of tensors (flattened into one fp32-or-wider buffer)."""
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view_as(t).to(t.dtype))
        start += t.numel()
    return out


class DataParallel:
    """The engine's view of the process group: shards, shares and the reductions. Inactive in one process."""

    def __init__(self, enabled: bool | None, device: torch.device | None) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.active = (world > 1 or dist.is_initialized()) if enabled is None else enabled
        if self.active and not dist.is_initialized():
            cuda = device is not None and device.type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo")
        self.world = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0

    def broadcast(self, modules: Iterable[torch.nn.Module]) -> None:
        """Rank 0's parameters and buffers everywhere: every rank starts from the same state."""
        if not self.active:
            return
        with torch.no_grad():
            for module in modules:
                for t in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(t, 0)

    def shard(self, batch: Any) -> tuple[Any, float]:
        """This rank's part of a global batch and its share ``n_rank / n_global`` (1.0 in one process)."""
        if not self.active:
            return batch, 1.0
        return split_batch(batch, self.world)[self.rank]

    def reduce(self, loss: Tensor, gradient: Params) -> tuple[Tensor, Params]:
        """The global loss and gradient from this rank's shares: one flat sum (differentiable if it has a graph)."""
        if not self.active:
            return loss, gradient
        keys = list(gradient)
        if any(g.requires_grad for g in gradient.values()):
            return _flat_sum([loss])[0], {k: _AllReduce.apply(gradient[k]) for k in keys}
        reduced = _flat_sum([loss, *(gradient[k] for k in keys)])
        return reduced[0], dict(zip(keys, reduced[1:], strict=True))

    def averaged(self, values: Params) -> Params:
        """``values`` as this rank's loss reads them: every derivative reaching them is their mean over
        ranks (:class:`_Averaged`).

        One averaging node per problem (keys ``"<problem>.<param>"``), not one for all: autograd runs a
        node's backward whenever *any* of its inputs leads to what is differentiated, and the node's
        backward (its :class:`_FlatSum`, differentiated again by every Hessian-vector product) joins its
        tensors likewise. One node over every problem a loss reads tied each problem's derivative to the
        others': at three levels, differentiating the middle level's gradient in the top's parameter went
        through the lowest level's push (which reads no top parameter) only because its cotangent came out
        of the node that also held the top's, and ran two adjoint solves (16 to 25 Hessian-vector products
        and their all-reduces per top step) that add exact zeros, which one process with
        ``accumulate_steps`` (one view per tensor) skips. Per problem the graph prunes as one process's
        does (a best response, a window's step and a push take all of a problem's tensors together, so
        finer groups prune nothing more) and a problem the derivative does not reach is not all-reduced;
        the price is one all-reduce per problem a backward reaches instead of one per backward. The same
        program on every rank builds the same nodes, so every rank runs the same collectives in the same
        order. Each tensor comes out as its own view: the outputs of one autograd function share one
        node, and the loss audit (``_audit.py``) tells the problems a loss reads by node."""
        if not self.active:
            return values
        problems: dict[str, list[str]] = {}
        for k, t in values.items():
            if t.requires_grad:
                problems.setdefault(k.split(".", 1)[0], []).append(k)
        read = dict(values)
        for keys in problems.values():
            averaged = _Averaged.apply(*(values[k] for k in keys))
            read.update({k: t.view_as(t) for k, t in zip(keys, averaged, strict=True)})
        return read

    def sum(self, params: Params) -> Params:
        """A sum over ranks of a vector (differentiable when it has a graph)."""
        if not self.active:
            return params
        if any(t.requires_grad for t in params.values()):
            return {k: _AllReduce.apply(t) for k, t in params.items()}
        keys = list(params)
        return dict(zip(keys, _flat_sum([params[k] for k in keys]), strict=True))

    def mean(self, params: Params) -> Params:
        """The mean over ranks of each rank's part of a cotangent: the right-hand side of a solve's adjoint
        system (:class:`~betty_like.hypergrad._linsolve.LinearSystem`), the same on every rank."""
        if not self.active:
            return params
        return {k: t / self.world for k, t in self.sum(params).items()}

    def matvec_wrap(self, inner: Callable[[MatVec], MatVec]) -> Callable[[MatVec], MatVec]:
        """Every Hessian-vector product summed over ranks (after ``inner``, the precision wrap)."""
        if not self.active:
            return inner
        return lambda matvec: inner(lambda u: self.sum(matvec(u)))

    def push_wrap(self, inner: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
        """A method's push (wrapped by ``inner``) on the global vector; its result enters each rank's
        gradient divided by the world size, which the step's sum over ranks restores."""
        if not self.active:
            return inner

        def wrap(push: Callable) -> Callable:
            inner_push = inner(push)

            def reduced(ctx: Any) -> Any:
                pushed, info = inner_push(replace(ctx, v=self.sum(ctx.v)))
                return {k: t / self.world for k, t in self.sum(pushed).items()}, info

            return reduced

        return wrap


def check_exact(problem: str, method: str, data_parallel: bool) -> None:
    """Under ``data_parallel``, refuse a method whose ranks would not compute the same hypergradient.

    ``kfac`` preconditions its solve with Kronecker factors of the layers' inputs and output Hessians
    on the rank's own shard: every rank would precondition differently, their conjugate-gradient
    iterates would part, and their solves would stop at different iterations (the collectives out of
    step). Every other method is exact: derivatives are averaged over ranks where each loss reads its
    parameters, so the ranks solve one system (``fixed_point`` updates with the global gradient).
    """
    if data_parallel and method == "kfac":
        raise ValueError(
            f"problem {problem!r}: hypergrad='kfac' cannot run under data parallel: its Kronecker factors come from "
            "each rank's own shard, so the ranks would precondition their solves differently and part; use "
            "hypergrad='cg' (with curvature='gauss_newton' for positive semi-definite products)"
        )
