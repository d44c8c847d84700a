"""Autograd graph memory, measured as the bytes of tensors saved for backward.

On CPU, Python's ``tracemalloc`` does not see torch's allocator, and process RSS is dominated by
the allocator's caching, so the memory that backpropagation through time actually costs is
measured directly: every tensor autograd saves for the backward pass passes through
``torch.autograd.graph.saved_tensors_hooks``; distinct storages are counted once. Taken right
before ``backward()``, the total is the peak of graph memory, since nothing is freed earlier.
"""

from __future__ import annotations

from types import TracebackType

import torch


class SavedTensorMeter:
    """Context manager counting distinct storages saved for backward inside it (``.bytes``)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[tuple[int, torch.device]] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._hooks.__exit__(kind, exc, tb)
