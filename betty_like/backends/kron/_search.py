"""Active-neuron search over a pre-activation table P (m neurons x n inputs).

A step needs, for each input j of the batch, the neurons with P[r, j] > b. Two structures answer
that query and both own the table, so that in-place row updates of P are seen by the next query:

- ``MaskSearch``: compares the whole column, O(m) per input; one vectorised op, best on small m.
- ``TreeSearch``: per input, a segment tree of maxima over the neurons (all n trees stored as one
  (2M, n) tensor whose bottom rows are P). A query descends only into subtrees whose maximum
  exceeds b, O(|active| log m) per input; changing k rows costs O(k n log m) to refresh maxima.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class MaskSearch:
    """Active set by a dense comparison of the batch columns of P."""

    def __init__(self, values: Tensor) -> None:
        self.values = values.clone(memory_format=torch.contiguous_format)

    def query(self, cols: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
        """Pairs (neuron r, batch position k) with P[r, cols[k]] > threshold."""
        rows, pos = (self.values.index_select(1, cols) > threshold).nonzero(as_tuple=True)
        return rows, pos

    def refresh(self, rows: Tensor) -> None:
        """Nothing to maintain: the comparison reads P directly."""


class TreeSearch:
    """Active set by descending per-input segment trees of maxima over the neurons."""

    def __init__(self, values: Tensor) -> None:
        m, n = values.shape
        self.leaf0 = 1 << max(1, math.ceil(math.log2(m)))
        self.depth = int(math.log2(self.leaf0))
        self._tree = torch.full((2 * self.leaf0, n), -math.inf, dtype=values.dtype, device=values.device)
        self._tree[self.leaf0 : self.leaf0 + m] = values
        lo = self.leaf0 // 2
        while lo >= 1:
            self._tree[lo : 2 * lo] = torch.maximum(
                self._tree[2 * lo : 4 * lo : 2], self._tree[2 * lo + 1 : 4 * lo : 2]
            )
            lo //= 2
        self.values = self._tree[self.leaf0 : self.leaf0 + m]

    def query(self, cols: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
        """Pairs (neuron r, batch position k) with P[r, cols[k]] > threshold."""
        pos = torch.arange(cols.numel(), device=cols.device)
        node = torch.ones_like(pos)
        keep = self._tree[node, cols] > threshold
        node, pos = node[keep], pos[keep]
        for _ in range(self.depth):
            node = torch.cat((2 * node, 2 * node + 1))
            pos = torch.cat((pos, pos))
            keep = self._tree[node, cols[pos]] > threshold
            node, pos = node[keep], pos[keep]
        return node - self.leaf0, pos

    def refresh(self, rows: Tensor) -> None:
        """Recompute the maxima above the leaves of ``rows`` after those rows of P changed."""
        node = torch.unique((rows + self.leaf0) // 2)
        for _ in range(self.depth):
            self._tree[node] = torch.maximum(self._tree[2 * node], self._tree[2 * node + 1])
            node = torch.unique(node // 2)


SEARCHES = {"mask": MaskSearch, "tree": TreeSearch}
