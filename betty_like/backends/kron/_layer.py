"""Kronecker-factored inputs and the linear layer that consumes them without materialising x.

An input x = u ⊗ v (``torch.kron(u, v) == outer(u, v).flatten()``) has d = p * q entries but only
p + q degrees of freedom. Keeping the factors and a weight that is itself a sum of Kronecker
products turns every inner product <w_r, x> into products of short inner products, so a layer of
m neurons costs O(m * rank * (p + q)) per input instead of O(m * p * q).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class KronData:
    """A set of n inputs x_i = U[i] ⊗ V[i], stored as the factors U (n, p) and V (n, q).

    Only ``materialize`` builds the d = p * q dimensional inputs; it exists for tests and for the
    dense baseline, never for the fast path.
    """

    U: Tensor
    V: Tensor

    def __post_init__(self) -> None:
        if self.U.dim() != 2 or self.V.dim() != 2:
            raise ValueError(
                f"KronData needs 2-D factors U (n, p) and V (n, q); got shapes {tuple(self.U.shape)} and "
                f"{tuple(self.V.shape)}. Stack one factor per row."
            )
        if self.U.shape[0] != self.V.shape[0]:
            raise ValueError(
                f"KronData factors disagree on the number of inputs: U has {self.U.shape[0]} rows, V has "
                f"{self.V.shape[0]}. Give one (u, v) pair per input."
            )
        if self.U.dtype != self.V.dtype or self.U.device != self.V.device:
            raise TypeError(
                f"KronData factors must share dtype and device; got {self.U.dtype}/{self.U.device} and "
                f"{self.V.dtype}/{self.V.device}. Convert one with .to()."
            )

    @property
    def n(self) -> int:
        """Number of inputs."""
        return self.U.shape[0]

    @property
    def p(self) -> int:
        """Length of the first factor."""
        return self.U.shape[1]

    @property
    def q(self) -> int:
        """Length of the second factor."""
        return self.V.shape[1]

    @property
    def d(self) -> int:
        """Dimension of the (never built) inputs, p * q."""
        return self.p * self.q

    def __getitem__(self, index: Tensor | slice | int) -> KronData:
        """The inputs selected by ``index``, still in factored form."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return KronData(self.U[index], self.V[index])

    def materialize(self) -> Tensor:
        """The dense inputs (n, p * q), row i equal to ``torch.kron(U[i], V[i])``. O(n d) memory."""
        return (self.U[:, :, None] * self.V[:, None, :]).reshape(self.n, self.d)

    def gram(self, other: KronData | None = None) -> Tensor:
        """Inner products <x_i, x'_j> = <u_i, u'_j> <v_i, v'_j> in O(n n' (p + q)), without d."""
        other = self if other is None else other
        if (other.p, other.q) != (self.p, self.q):
            raise ValueError(
                f"gram needs inputs of the same factor shapes; got (p, q) = {(self.p, self.q)} and "
                f"{(other.p, other.q)}."
            )
        return (self.U @ other.U.T) * (self.V @ other.V.T)


class KroneckerLinear(nn.Module):
    """A linear layer on inputs given as factors (u, v), with Kronecker-structured weights.

    Neuron r has weight w_r = sum_k kron(A[r, k], B[r, k]) with A (m, rank, p) and B (m, rank, q),
    so <w_r, u ⊗ v> = sum_k <A[r, k], u> <B[r, k], v>. Forward, backward and double backward are
    plain einsums, O(m * rank * (p + q)) per input, and equal the dense layer whose weight is
    ``dense_weight()`` applied to ``torch.kron(u, v)``. A rank of min(p, q) represents every dense
    weight (through its SVD); rank 1 is the cheapest.

    ``std`` is the standard deviation of the entries of the dense weight at initialisation (default
    1/sqrt(p * q), as for a fan-in scaled dense layer); the factors are drawn Gaussian so that the
    dense entries have exactly that variance.
    """

    def __init__(
        self,
        p: int,
        q: int,
        out_features: int,
        rank: int = 1,
        bias: bool = True,
        std: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("p", p), ("q", q), ("out_features", out_features), ("rank", rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KroneckerLinear needs a positive integer {name}; got {value!r}.")
        self.p, self.q, self.out_features, self.rank = p, q, out_features, rank
        std = 1.0 / math.sqrt(p * q) if std is None else std
        # Var(sum_k a b) = rank * s_a^2 * s_b^2 = std^2 with s_a = s_b.
        factor_std = math.sqrt(std) / rank**0.25
        kw = {"dtype": dtype, "device": device}
        self.weight_u = nn.Parameter(
            torch.randn(out_features, rank, p, generator=generator, **kw) * factor_std
        )
        self.weight_v = nn.Parameter(
            torch.randn(out_features, rank, q, generator=generator, **kw) * factor_std
        )
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        """Outputs (..., m) for inputs kron(u, v) with u (..., p) and v (..., q)."""
        if u.shape[-1] != self.p or v.shape[-1] != self.q:
            raise ValueError(
                f"KroneckerLinear expects factors of lengths (p, q) = {(self.p, self.q)}; got "
                f"{(u.shape[-1], v.shape[-1])}."
            )
        su = torch.einsum("...p,mkp->...mk", u, self.weight_u)
        sv = torch.einsum("...q,mkq->...mk", v, self.weight_v)
        out = (su * sv).sum(-1)
        return out if self.bias is None else out + self.bias

    def dense_weight(self) -> Tensor:
        """The equivalent dense weight (m, p * q); differentiable. O(m d) memory: tests and baselines only."""
        w = torch.einsum("mkp,mkq->mpq", self.weight_u, self.weight_v)
        return w.reshape(self.out_features, self.p * self.q)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"p={self.p}, q={self.q}, out_features={self.out_features}, rank={self.rank}, bias={bias}"
