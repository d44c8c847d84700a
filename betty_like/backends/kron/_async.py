"""Asynchronous SGD for `KronTwoLayerSGD`: worker processes updating the implicit weights in shared memory.

The state that changes, the coefficients C and pre-activations P, is moved into shared memory; the
Gram matrix K, targets and signs are shared read-only. A fixed batch schedule is split round-robin:
worker k takes global steps k, k + W, k + 2W, ...

- `synchronous=False` (Hogwild): workers read P and write their updates without any lock. Writes
  to the same entries may race, which is the price of lock-freedom.
- `synchronous=True`: a condition variable hands the state to the worker owning the next global
  step, so steps are applied one at a time in schedule order. With staleness 0 this reproduces
  sequential SGD on the same schedule exactly, and no update can be lost.

`staleness` = tau delays each worker's writes by tau of its own steps (an update computed at local
step s is written after local step s + tau is computed), so gradients are taken on weights that miss
at least the worker's tau latest updates; the queue is flushed at the end. Only the vectorised mask
search is used: the tree's maxima would need locks to stay consistent under concurrent writes.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import traceback
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp
from torch import Tensor

from ._sgd import KronTwoLayerSGD, Update, apply_update, compute_update


@dataclass(frozen=True)
class AsyncResult:
    """What a run did: per-global-step batch losses, updates applied per worker, and compute time.

    `seconds` runs from the moment all workers were released (process start-up excluded) to the
    last worker's end.
    """

    losses: Tensor
    applied: Tensor
    seconds: float


@dataclass(frozen=True)
class _Shared:
    P: Tensor
    C: Tensor
    K: Tensor
    targets: Tensor
    signs: Tensor
    schedule: Tensor
    losses: Tensor
    applied: Tensor
    ends: Tensor


def _worker(
    rank: int,
    workers: int,
    shared: _Shared,
    shift: float,
    lr: float,
    staleness: int,
    synchronous: bool,
    wait: float,
    turn,
    cond,
    start,
    errors,
) -> None:
    """Run the global steps rank, rank + workers, ... of the schedule; report failures on `errors`."""
    try:
        torch.set_num_threads(1)
        s = shared
        pending: deque = deque()
        start.wait(timeout=wait)
        for t in range(rank, s.schedule.shape[0], workers):
            with cond if synchronous else nullcontext():
                if synchronous and not cond.wait_for(lambda t=t: turn.value == t, timeout=wait):
                    raise TimeoutError(f"worker {rank} waited over {wait} s for step {t}")
                pending.append(_one_step(s, s.schedule[t], t, shift, lr))
                if len(pending) > staleness:
                    apply_update(s.P, s.C, s.K, pending.popleft())
                    s.applied[rank] += 1
                if synchronous:
                    turn.value = t + 1
                    cond.notify_all()
        while pending:
            with cond if synchronous else nullcontext():
                apply_update(s.P, s.C, s.K, pending.popleft())
            s.applied[rank] += 1
        s.ends[rank] = time.monotonic()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, which re-raises it
        errors.put(f"worker {rank}:\n{traceback.format_exc()}")
        start.abort()


def _one_step(s: _Shared, cols: Tensor, t: int, shift: float, lr: float) -> Update:
    """Compute (not apply) the update of global step t from the current shared P."""
    rows, pos = (s.P.index_select(1, cols) > shift).nonzero(as_tuple=True)
    result, update = compute_update(s.P[rows, cols[pos]], rows, pos, cols, s.targets, s.signs, shift, lr)
    s.losses[t] = result.loss
    return update


def async_sgd(
    trainer: KronTwoLayerSGD,
    schedule: Tensor,
    workers: int = 2,
    staleness: int = 0,
    synchronous: bool = False,
    timeout: float = 120.0,
    start_method: str = "spawn",
) -> AsyncResult:
    """Run the steps of `schedule` (T, S input indices) on `trainer` with `workers` processes.

    The trainer's C and P are updated in place (they are moved to shared memory). Raises
    RuntimeError with the worker's traceback if a worker fails, and TimeoutError if the run exceeds
    `timeout` seconds; in both cases every worker process is terminated and joined first.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer; got {workers!r}.")
    if not isinstance(staleness, int) or staleness < 0:
        raise ValueError(f"staleness must be a non-negative integer (0 = write at once); got {staleness!r}.")
    if schedule.dim() != 2 or schedule.dtype != torch.long:
        raise ValueError(
            f"schedule must be a 2-D long tensor (steps, batch size) of input indices; got {schedule.dtype} "
            f"of shape {tuple(schedule.shape)}."
        )
    if trainer.P.device.type != "cpu":
        raise ValueError("async_sgd shares memory between CPU processes; build the trainer on the CPU.")
    if type(trainer.search).__name__ != "MaskSearch":
        raise ValueError("async_sgd needs a trainer built with search='mask' (the tree is not lock-free).")
    ctx = mp.get_context(start_method)
    steps = schedule.shape[0]
    shared = _Shared(
        P=trainer.P.share_memory_(),
        C=trainer.C.share_memory_(),
        K=trainer.K.share_memory_(),
        targets=trainer.targets.share_memory_(),
        signs=trainer.signs.share_memory_(),
        schedule=schedule.contiguous().share_memory_(),
        losses=torch.full((steps,), math.nan, dtype=trainer.P.dtype).share_memory_(),
        applied=torch.zeros(workers, dtype=torch.long).share_memory_(),
        ends=torch.zeros(workers, dtype=torch.float64).share_memory_(),
    )
    turn, cond, errors = ctx.Value("q", 0), ctx.Condition(), ctx.Queue()
    start = ctx.Barrier(workers + 1)
    args = (
        workers,
        shared,
        trainer.shift,
        trainer.lr,
        staleness,
        synchronous,
        timeout,
        turn,
        cond,
        start,
        errors,
    )
    procs = [ctx.Process(target=_worker, args=(rank, *args), daemon=True) for rank in range(workers)]
    try:
        for proc in procs:
            proc.start()
        try:
            start.wait(timeout=timeout)
        except threading.BrokenBarrierError:
            _wait(procs, errors, time.monotonic() + 5.0, 5.0)
            raise TimeoutError(
                f"asynchronous SGD workers did not start within timeout={timeout} s."
            ) from None
        began = time.monotonic()
        _wait(procs, errors, began + timeout, timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    return AsyncResult(shared.losses.clone(), shared.applied.clone(), float(shared.ends.max()) - began)


def _wait(procs: list, errors, deadline: float, timeout: float) -> None:
    """Join the workers; raise at the first reported failure, an abnormal exit, or the deadline."""
    while any(proc.is_alive() for proc in procs):
        _raise_reported(errors)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"asynchronous SGD did not finish within timeout={timeout} s; raise it or run fewer steps."
            )
        next(proc for proc in procs if proc.is_alive()).join(0.05)
    _raise_reported(errors)
    codes = [proc.exitcode for proc in procs]
    if any(code != 0 for code in codes):
        raise RuntimeError(f"an asynchronous SGD worker exited abnormally; exit codes {codes}.")


def _raise_reported(errors) -> None:
    """Re-raise the first traceback a worker put on the error queue, if any."""
    try:
        report = errors.get_nowait()
    except queue.Empty:
        return
    raise RuntimeError(f"asynchronous SGD failed in {report}")
