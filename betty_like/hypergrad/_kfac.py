"""KFAC factors of a lower problem's Linear and Conv2d layers, and the preconditioner they give.

For a layer with inputs ``a`` (a ones column appended when its bias is trained; a Conv2d's inputs
unfolded into patches) and output gradients ``g``, the curvature block of its weights is approximated
by the Kronecker product ``A ⊗ G`` with ``A = mean over rows of a a^T`` and ``G = sum over rows of
g g^T`` (Martens and Grosse, 2015; Grosse and Martens, 2016; positions of a sequence or image count
as rows, the "expand" convention of Eschenhagen et al., 2023). The ``g`` are not gradients of the
loss but the columns of ``J^T S``, with ``S S^T = H_out`` the Hessian of the output loss per output
row: then ``A ⊗ G`` approximates the Gauss-Newton block, and is exact for one example through a
single linear layer. Each block is inverted exactly with its damping, ``(A ⊗ G + λ I)^-1``, through
the eigendecompositions of ``A`` and ``G``; every other parameter gets a scaled identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._linsolve import MatVec
from ._tree import Params, dot

RELATIVE_DAMPING = 1e-3  # λ of a block without configured damping, times its mean eigenvalue


@dataclass(frozen=True)
class Block:
    """One Kronecker-factored layer: its weight's key, its bias's key (``None``: not trained), the layer."""

    weight: str
    bias: str | None
    layer: nn.Module


@dataclass(frozen=True)
class Eigen:
    """A block's curvature in the Kronecker eigenbasis ``Qa ⊗ Qg`` of its factors: ``values[i, j] = dg_i da_j``
    along ``(Qg)_i (Qa)_j^T``."""

    qa: Tensor
    qg: Tensor
    values: Tensor

    def mean_eigenvalue(self) -> float:
        """The mean eigenvalue of the block."""
        return float(self.values.mean())


def _factored(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return (
        isinstance(layer, nn.Conv2d)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def blocks_of(module: nn.Module, owner: str, w: Params) -> list[Block]:
    """The layers of ``module`` whose trained weight KFAC factors (grouped, circularly padded convs are not)."""
    blocks = []
    for name, layer in module.named_modules():
        prefix = f"{owner}.{name}." if name else f"{owner}."
        if _factored(layer) and prefix + "weight" in w:
            bias = prefix + "bias" if prefix + "bias" in w else None
            blocks.append(Block(prefix + "weight", bias, layer))
    return blocks


def _record(store: list[tuple[Tensor, Tensor]], layer: nn.Module, inputs: tuple, output: Tensor) -> None:
    store.append((inputs[0].detach(), output))


def _input_rows(layer: nn.Module, x: Tensor, bias: bool) -> Tensor:
    if isinstance(layer, nn.Conv2d):
        batched = x if x.dim() == 4 else x.unsqueeze(0)
        patches = F.unfold(batched, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    return torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1) if bias else rows


def _output_rows(layer: nn.Module, g: Tensor) -> Tensor:
    if isinstance(layer, nn.Conv2d):
        batched = g if g.dim() == 4 else g.unsqueeze(0)
        return batched.permute(0, 2, 3, 1).reshape(-1, batched.shape[1])
    return g.reshape(-1, g.shape[-1])


def output_hessian_roots(outputs: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``S`` with ``S[r] S[r]^T`` the Hessian of ``loss_fn`` in output row ``r`` (last dimension: the row's entries).

    Rows are taken as independent (a loss summed or averaged over examples); negative eigenvalues of
    a non-convex output loss are clipped to zero, which keeps the factors positive semi-definite.
    """
    width = outputs.shape[-1] if outputs.dim() >= 2 else 1
    z = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(loss_fn(z), z, create_graph=True)
        rows = gradient.reshape(-1, width)
        hessian = torch.zeros(rows.shape[0], width, width, dtype=z.dtype, device=z.device)
        if gradient.requires_grad:
            for c in range(width):
                (column,) = torch.autograd.grad(rows[:, c].sum(), z, retain_graph=True, allow_unused=True)
                if column is not None:
                    hessian[:, c, :] = column.reshape(-1, width)
    values, vectors = torch.linalg.eigh(0.5 * (hessian + hessian.transpose(1, 2)).double())
    return (vectors * values.clamp(min=0.0).sqrt().unsqueeze(1)).to(z.dtype)


@dataclass(frozen=True)
class LayerRows:
    """What a layer's factors are made of: its input rows ``(R, in)`` and, per output-Hessian root
    column ``c``, the root backpropagated to its output rows, ``gradients[c]`` of shape ``(R, out)``."""

    inputs: Tensor
    gradients: Tensor

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, G)``: the mean of ``a a^T`` over rows and the sum of ``g g^T`` over rows and columns."""
        g = self.gradients.reshape(-1, self.gradients.shape[-1])
        return self.inputs.T @ self.inputs / self.inputs.shape[0], g.T @ g


def layer_rows(split: Callable[[], tuple[Tensor, Callable[[Tensor], Tensor]]], blocks: list[Block]) -> dict[str, LayerRows]:
    """Every block's :class:`LayerRows` from one evaluation of the split objective (each call of a shared layer counts)."""
    records: dict[str, list[tuple[Tensor, Tensor]]] = {b.weight: [] for b in blocks}
    handles = [b.layer.register_forward_hook(partial(_record, records[b.weight])) for b in blocks]
    try:
        with torch.enable_grad():
            outputs, loss_fn = split()
    finally:
        for handle in handles:
            handle.remove()
    used = [b for b in blocks if records[b.weight]]
    roots = output_hessian_roots(outputs, loss_fn)
    layer_outputs = [out for b in used for _, out in records[b.weight]]
    columns: dict[str, list[Tensor]] = {b.weight: [] for b in used}
    for c in range(roots.shape[-1]):
        cotangent = roots[:, :, c].reshape(outputs.shape)
        found = torch.autograd.grad(outputs, layer_outputs, grad_outputs=cotangent, retain_graph=True, allow_unused=True)
        found = [torch.zeros_like(out) if g is None else g for g, out in zip(found, layer_outputs, strict=True)]
        position = 0
        for b in used:
            calls = len(records[b.weight])
            columns[b.weight].append(torch.cat([_output_rows(b.layer, g) for g in found[position : position + calls]]))
            position += calls
    return {
        b.weight: LayerRows(
            torch.cat([_input_rows(b.layer, x, b.bias is not None) for x, _ in records[b.weight]]),
            torch.stack(columns[b.weight]),
        )
        for b in used
    }


def kronecker_factors(
    split: Callable[[], tuple[Tensor, Callable[[Tensor], Tensor]]], blocks: list[Block]
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{weight key: (A, G)}`` from one evaluation of the split objective."""
    return {k: rows.factors() for k, rows in layer_rows(split, blocks).items()}


def eigen(rows: LayerRows) -> Eigen:
    """The block's eigenbasis and KFAC's eigenvalues ``dg_i da_j`` from its factors (in float64, round-off clipped).

    Eigenvalue correction (EK-FAC: the measured diagonal of the per-row Kronecker sum in this basis) was
    tried on the digits MLP of ``benchmarks/kfac_accuracy.py`` and changed the error of 10-40 iteration
    solves by under 10 %, so it is not offered.
    """
    a, g = rows.factors()
    da, qa = torch.linalg.eigh(a.double())
    dg, qg = torch.linalg.eigh(g.double())
    values = dg.clamp(min=0.0).unsqueeze(1) * da.clamp(min=0.0).unsqueeze(0)
    return Eigen(qa.to(a.dtype), qg.to(g.dtype), values.to(a.dtype))


def _block_inverse(block: Block, e: Eigen, damping: float, r: Params) -> dict[str, Tensor]:
    """``(A ⊗ G + damping I)^-1`` on the block's part of ``r``."""
    weight = r[block.weight]
    matrix = weight.reshape(weight.shape[0], -1)
    if block.bias is not None:
        matrix = torch.cat([matrix, r[block.bias].unsqueeze(1)], dim=1)
    rotated = e.qg.T @ matrix.to(e.qa.dtype) @ e.qa
    solved = e.qg @ (rotated / (e.values + damping)) @ e.qa.T
    solved = solved.to(weight.dtype)
    result = {block.weight: solved[:, : matrix.shape[1] - (block.bias is not None)].reshape(weight.shape)}
    if block.bias is not None:
        result[block.bias] = solved[:, -1]
    return result


@dataclass(frozen=True)
class KroneckerPreconditioner:
    """``P ≈ (C + damping I)^-1`` for the system's curvature ``C``: damped Kronecker blocks and a scaled identity.

    ``dampings`` holds each block's ``λ``; ``others`` is the damped curvature scale of the parameters no
    block covers, each of which gets ``1 / others``.
    """

    blocks: tuple[Block, ...]
    eigens: dict[str, Eigen]
    dampings: dict[str, float]
    others: float

    def __call__(self, r: Params) -> Params:
        result: Params = {}
        for block in self.blocks:
            if block.weight in self.eigens:
                result.update(_block_inverse(block, self.eigens[block.weight], self.dampings[block.weight], r))
        factor = 1.0 / self.others
        return {k: result[k] if k in result else factor * t for k, t in r.items()}


def build_preconditioner(
    blocks: list[Block],
    rows: dict[str, LayerRows],
    damping: float,
    block_damping: float | None,
    others_scale: Callable[[set], float],
) -> KroneckerPreconditioner:
    """The preconditioner of the given factors; ``others_scale(keys)`` measures the system's curvature on the rest.

    Each block is inverted as ``(A ⊗ G + λ I)^-1``: ``λ = block_damping`` when given, else the system's
    ``damping`` plus :data:`RELATIVE_DAMPING` times the block's mean eigenvalue. ``A ⊗ G`` is singular
    whenever a layer has fewer rows than inputs, and directions it underrates would otherwise be
    amplified by ``1 / damping``.
    """
    eigens = {k: eigen(r) for k, r in rows.items()}
    dampings = {
        k: block_damping if block_damping is not None else damping + RELATIVE_DAMPING * e.mean_eigenvalue() or 1.0
        for k, e in eigens.items()
    }
    covered = {k for b in blocks if b.weight in eigens for k in (b.weight, b.bias) if k is not None}
    scale = others_scale(covered)  # measured on the system, damping included
    if not (scale > 0):  # no other parameters, or no positive curvature along them: the blocks' mean
        means = [e.mean_eigenvalue() for e in eigens.values()]
        scale = (sum(means) / len(means) if means and sum(means) > 0 else 1.0) + damping
    return KroneckerPreconditioner(tuple(blocks), eigens, dampings, scale)


def rayleigh_scale(matvec: MatVec, b: Params, covered: set) -> float:
    """``u^T A u / u^T u`` for ``u`` the part of ``b`` outside ``covered`` and ``A`` the system (one product; 0 when that part is zero)."""
    u = {k: torch.zeros_like(t) if k in covered else t for k, t in b.items()}
    size = float(dot(u, u))
    if size == 0.0:
        return 0.0
    return float(dot(u, matvec(u))) / size
