"""Kronecker-structured layers and (asynchronous) SGD whose per-step cost does not grow with d.

Inputs x = u ⊗ v of dimension d = p * q are kept as their factors (``KronData``). ``KroneckerLinear``
applies Kronecker-structured weights to them in O(m (p + q)) per input. ``KronTwoLayerSGD`` trains the
two-layer shifted-ReLU network f(x) = (1/sqrt(m)) sum_r a_r relu(<w_r, x> - b) with its weights in
the span of their start plus the data, finding the few active neurons by a mask or a tree search,
and gives the iterates of dense SGD (``DenseTwoLayerSGD``) at a per-step cost free of d that grows with
the number of active neurons rather than with m. ``async_sgd`` runs the same steps from several processes on shared memory, lock-free or in a
synchronous mode that loses no update. See docs/backends/kron.md.
"""

from ._async import AsyncResult, AsyncWorkerError, async_sgd
from ._layer import KronData, KroneckerLinear
from ._search import MaskSearch, TreeSearch
from ._sgd import DenseTwoLayerSGD, KronTwoLayerSGD, StepResult, Update, default_shift

__all__ = [
    "AsyncResult",
    "AsyncWorkerError",
    "DenseTwoLayerSGD",
    "KronData",
    "KronTwoLayerSGD",
    "KroneckerLinear",
    "MaskSearch",
    "StepResult",
    "TreeSearch",
    "Update",
    "async_sgd",
    "default_shift",
]
