"""Exact SGD for the two-layer shifted-ReLU network on Kronecker inputs, with weights in implicit form.

The network is f(x) = (1/sqrt(m)) sum_r a_r relu(<w_r, x> - b) with fixed signs a_r in {+1, -1};
only W is trained, on the loss 0.5 * mean_j (f(x_j) - y_j)^2 over a batch. Its gradient for w_r is a
combination of the batch inputs, so the weights stay in the span of their start plus the data:

    w_r(t) = w_r(0) + sum_i C[r, i] x_i,    P[r, j] = <w_r, x_j> = P0[r, j] + sum_i C[r, i] K[i, j],

with the Gram matrix K = (U U^T) * (V V^T). A step on a batch B of size S reads P[:, B], finds the
active pairs (r, j) with P[r, j] > b by a search structure, adds each pair's coefficient change
ΔC[r, j] to C and ΔC[r, j] K[j, :] to row r of P: O(pairs * n) work, with pairs = S * (active
neurons per input), and d never appears. The iterates
are those of dense SGD on the materialised inputs, up to floating-point rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layer import KronData, KroneckerLinear
from ._search import SEARCHES


@dataclass(frozen=True)
class StepResult:
    """Batch loss 0.5 * mean (f - y)^2 and predictions f, both taken before the update."""

    loss: Tensor
    pred: Tensor


@dataclass(frozen=True)
class Update:
    """A step's change of the coefficients, as pairs: ΔC[rows[i], cols[i]] += coef[i] (pairs may repeat)."""

    rows: Tensor
    cols: Tensor
    coef: Tensor


def default_shift(m: int) -> float:
    """The threshold b = sqrt(0.4 log m), which leaves about m^0.8 of m neurons active at start."""
    return math.sqrt(0.4 * math.log(m))


def compute_update(
    pre: Tensor, rows: Tensor, pos: Tensor, cols: Tensor, y: Tensor, signs: Tensor, shift: float, lr: float
) -> tuple[StepResult, Update]:
    """Loss, predictions and SGD update from the active pairs (rows[i], pos[i]) and their pre-activations.

    ``pre[i]`` is <w_rows[i], x_cols[pos[i]]> and exceeds ``shift``; ``cols`` are the batch's input indices.
    """
    m, size = signs.numel(), cols.numel()
    scale = 1.0 / math.sqrt(m)
    pred = torch.zeros(size, dtype=pre.dtype, device=pre.device).index_add_(
        0, pos, signs[rows] * (pre - shift)
    )
    pred = pred * scale
    err = pred - y[cols]
    loss = 0.5 * (err * err).mean()
    coef = (-lr * scale / size) * err[pos] * signs[rows]
    return StepResult(loss, pred), Update(rows, cols[pos], coef)


def apply_update(P: Tensor, C: Tensor, K: Tensor, update: Update) -> None:
    """Write an update into C and P in place: one length-n row per active pair, O(pairs * n)."""
    C.index_put_((update.rows, update.cols), update.coef, accumulate=True)
    P.index_add_(0, update.rows, update.coef[:, None] * K[update.cols])


class KronTwoLayerSGD:
    """Minibatch SGD on the two-layer shifted-ReLU network at a per-step cost free of d.

    A step costs O(pairs * n) for the update, pairs = S * (active neurons per input), plus the
    search: O(S m) for the mask, O(pairs log m) query + O(pairs n log m) refresh for the tree.
    ``first_layer`` gives the initial weights w_r(0) (a ``KroneckerLinear`` without bias, so their inner
    products with the data cost O(m n rank (p + q))); ``signs`` are the fixed output signs a_r.
    ``search`` picks the active-neuron structure: "mask" (vectorised scan of the batch columns) or
    "tree" (segment trees of maxima per input, output-sensitive). Both give the same iterates.
    """

    def __init__(
        self,
        data: KronData,
        targets: Tensor,
        first_layer: KroneckerLinear,
        signs: Tensor,
        lr: float,
        shift: float | None = None,
        search: str = "mask",
    ) -> None:
        if first_layer.bias is not None:
            raise ValueError("KronTwoLayerSGD needs a first layer without bias: build it with bias=False.")
        if (first_layer.p, first_layer.q) != (data.p, data.q):
            raise ValueError(
                f"first_layer takes factors of lengths {(first_layer.p, first_layer.q)} but the data has "
                f"{(data.p, data.q)}."
            )
        if targets.shape != (data.n,):
            raise ValueError(
                f"targets must have shape ({data.n},), one per input; got {tuple(targets.shape)}."
            )
        if signs.shape != (first_layer.out_features,):
            raise ValueError(
                f"signs must have shape ({first_layer.out_features},), one per neuron; "
                f"got {tuple(signs.shape)}."
            )
        if search not in SEARCHES:
            raise ValueError(f"search={search!r} is unknown; choose one of {sorted(SEARCHES)}.")
        if not lr > 0:
            raise ValueError(f"lr must be positive; got {lr!r}.")
        self.data, self.first_layer, self.lr = data, first_layer, float(lr)
        self.m = first_layer.out_features
        self.shift = default_shift(self.m) if shift is None else float(shift)
        self.targets = targets.to(data.U.dtype)
        self.signs = signs.to(data.U.dtype)
        self.K = data.gram()
        self.C = torch.zeros(self.m, data.n, dtype=data.U.dtype, device=data.U.device)
        with torch.no_grad():
            initial = first_layer(data.U, data.V).T
        self.search = SEARCHES[search](initial)

    @property
    def P(self) -> Tensor:
        """Current pre-activations <w_r, x_j>, shape (m, n)."""
        return self.search.values

    def step(self, cols: Tensor) -> StepResult:
        """One SGD step on the inputs ``cols``; returns the batch loss and predictions before the update."""
        rows, pos = self.search.query(cols, self.shift)
        result, update = compute_update(
            self.P[rows, cols[pos]], rows, pos, cols, self.targets, self.signs, self.shift, self.lr
        )
        apply_update(self.P, self.C, self.K, update)
        self.search.refresh(update.rows)
        return result

    def preactivations(self, data: KronData) -> Tensor:
        """<w_r, x'_j> for new inputs, (m, n'), in O(m n' rank (p + q) + m n n'): no d."""
        with torch.no_grad():
            initial = self.first_layer(data.U, data.V).T
        return initial + self.C @ self.data.gram(data)

    def predict(self, data: KronData) -> Tensor:
        """Network outputs f(x'_j) for new inputs, (n',)."""
        act = F.relu(self.preactivations(data) - self.shift)
        return self.signs @ act / math.sqrt(self.m)

    def full_loss(self) -> Tensor:
        """0.5 * mean (f - y)^2 over all training inputs, read from P."""
        pred = self.signs @ F.relu(self.P - self.shift) / math.sqrt(self.m)
        return 0.5 * ((pred - self.targets) ** 2).mean()

    def dense_weight(self) -> Tensor:
        """The current weights W (m, d) = W(0) + C X. Materialises X: for tests only."""
        with torch.no_grad():
            return self.first_layer.dense_weight() + self.C @ self.data.materialize()


class DenseTwoLayerSGD:
    """The baseline: the same network as ``nn.Linear`` + shifted ReLU + ``torch.optim.SGD`` on dense inputs.

    Each step materialises the batch's inputs from their factors (O(S d), below the O(S m d) of the
    layer itself), so the baseline needs no O(n d) copy of the data set.
    """

    def __init__(
        self,
        data: KronData,
        targets: Tensor,
        first_layer: KroneckerLinear,
        signs: Tensor,
        lr: float,
        shift: float | None = None,
    ) -> None:
        self.data, self.m = data, first_layer.out_features
        self.shift = default_shift(self.m) if shift is None else float(shift)
        dtype, device = data.U.dtype, data.U.device
        self.linear = nn.Linear(data.d, self.m, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            self.linear.weight.copy_(first_layer.dense_weight())
        self.targets = targets.to(dtype)
        self.signs = signs.to(dtype)
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=lr)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs f(x) for dense inputs x (S, d)."""
        return F.relu(self.linear(x) - self.shift) @ self.signs / math.sqrt(self.m)

    def step(self, cols: Tensor) -> StepResult:
        """One SGD step on the inputs ``cols``; returns the batch loss and predictions before the update."""
        pred = self.forward(self.data[cols].materialize())
        loss = 0.5 * ((pred - self.targets[cols]) ** 2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return StepResult(loss.detach(), pred.detach())
