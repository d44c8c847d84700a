"""Endless batches from whatever iterable a problem was given."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch


def split_batch(batch: Any, parts: int) -> list[tuple[Any, float]]:
    """``batch`` cut into ``parts`` shards along dim 0, each with its share ``n_shard / n_batch``.

    ``tensor_split`` sizes (no padding duplicates, unequal shards for an indivisible size) in every
    tensor of a (nested) tuple, list or dict; other leaves go to every shard whole. Data parallel takes
    shard ``rank`` of ``world`` (:class:`~betty_like.distributed.DataParallel`), and
    ``ProblemConfig(accumulate_steps=n)`` all ``n`` of them: the same shards and shares, so one process
    with ``n`` micro-batches computes what ``n`` ranks compute.
    """
    sizes: list[int] = []

    def split(b: Any) -> list[Any]:
        if torch.is_tensor(b) and b.dim() > 0:
            sizes.append(b.shape[0])
            return list(torch.tensor_split(b, parts))
        if isinstance(b, (list, tuple)):
            return [type(b)(column) for column in zip(*(split(x) for x in b), strict=True)] if b else [b] * parts
        if isinstance(b, Mapping):
            keys, columns = list(b), [split(v) for v in b.values()]
            return [dict(zip(keys, column, strict=True)) for column in zip(*columns, strict=True)] if b else [b] * parts
        return [b] * parts

    shards = split(batch)
    if not sizes:
        raise ValueError(
            f"splitting a batch into {parts} shards (data parallel or accumulate_steps) needs tensors with a batch "
            f"dimension (dim 0) in it, got {type(batch).__name__} holding none"
        )
    total = sizes[0]
    return [(shard, _share(total, parts, index)) for index, shard in enumerate(shards)]


def _share(total: int, parts: int, index: int) -> float:
    """``tensor_split``'s size of shard ``index`` over the total."""
    base, extra = divmod(total, parts)
    return (base + (1 if index < extra else 0)) / total


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside a (nested) tuple, list or dict batch to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class BatchStream:
    """Cycles a problem's data: re-iterates it when exhausted, and says clearly when it cannot.

    A re-iterable (list, DataLoader) is cycled; a one-shot iterator (a generator) is used until it
    ends, and then raises instead of hanging or silently repeating nothing. Under data parallel,
    ``shard`` cuts each global batch to this rank's part; ``share`` is that part's fraction of the
    last batch given.
    """

    def __init__(
        self, owner: str, data: Any, device: torch.device | None, shard: Callable[[Any], tuple[Any, float]] | None = None
    ) -> None:
        self.owner = owner
        self.data = data
        self.device = device
        self.shard = shard
        self.share = 1.0
        self._iterator: Iterator[Any] | None = None
        self._returned: list[tuple[Any, float]] = []
        self.drawn = 0  # batches taken and not put back: the position a checkpoint stores

    def put_back(self, batch: Any) -> None:
        """Return a batch whose step did not happen (an exception or interrupt): :meth:`next` gives it again."""
        self._returned.append((batch, self.share))
        self.drawn -= 1

    def skip(self, count: int, iteration: int) -> Any:
        """Draw and drop ``count`` batches (a resumed run's data position); returns the last one (or None)."""
        batch = None
        for _ in range(count):
            batch = self.next(iteration)
        return batch

    def next(self, iteration: int) -> Any:
        """The next batch (this rank's part of it); ``iteration`` only serves the error messages."""
        self.drawn += 1
        if self._returned:
            batch, self.share = self._returned.pop()
            return batch
        batch = self._next(iteration)
        if self.shard is not None:
            batch, self.share = self.shard(batch)
        return batch

    def _next(self, iteration: int) -> Any:
        if self.data is None:
            raise ValueError(f"problem {self.owner!r} has no data: pass data=<an iterable of batches>")
        for attempt in range(2):
            if self._iterator is None:
                self._iterator = self._iterate()
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                # an iterator is its own iterable (it cannot start over); asking with iter() would draw a
                # DataLoader's next shuffle and shift its epochs against a plain loop's
                if attempt == 1 or isinstance(self.data, Iterator):
                    self.drawn -= 1
                    raise ValueError(
                        f"problem {self.owner!r}: its data ran out at iteration {iteration} and cannot be cycled "
                        f"({type(self.data).__name__} is empty or a one-shot iterator); pass a re-iterable such as "
                        "a list or DataLoader, or an endless generator"
                    ) from None
                continue
            return to_device(batch, self.device) if self.device is not None else batch
        raise AssertionError("unreachable: the loop above returns or raises")

    def _iterate(self) -> Iterator[Any]:
        try:
            return iter(self.data)
        except TypeError:
            raise TypeError(
                f"problem {self.owner!r}: data of type {type(self.data).__name__} is not iterable; pass a "
                "DataLoader, a list of batches or a generator"
            ) from None


@contextlib.contextmanager
def borrowed(batches: dict[str, Any], streams: Mapping[str, BatchStream]) -> Iterator[None]:
    """Batches drawn into ``batches`` inside go back to their ``streams`` on exit (a check draws nothing)."""
    had = set(batches)
    try:
        yield
    finally:
        for name in [n for n in batches if n not in had]:
            streams[name].put_back(batches.pop(name))
