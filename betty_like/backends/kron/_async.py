"""Asynchronous SGD for ``KronTwoLayerSGD``: worker processes updating the implicit weights in shared memory.

The state that changes, the coefficients C and pre-activations P, is moved into shared memory; the
Gram matrix K, targets and signs are shared read-only. A fixed batch schedule is split round-robin:
worker k takes global steps k, k + W, k + 2W, ...

- ``synchronous=False`` (Hogwild): workers read P and write their updates without any lock. Writes
  to the same entries may race, which is the price of lock-freedom.
- ``synchronous=True``: a condition variable hands the state to the worker owning the next global
  step, so steps are applied one at a time in schedule order. With staleness 0 this reproduces
  sequential SGD on the same schedule exactly, and no update can be lost.

A worker that dies (a signal, an exception, a failure during start-up) is noticed by the parent
within ~0.1 s: the survivors are stopped, and ``AsyncWorkerError`` names the worker, its exit code or
traceback and the updates applied so far, and carries the losses recorded so far
(``error.result``). The trainer is left consistent:

- synchronous mode: every applied update is whole. Each update is written under the lock after its
  old C entries are saved in a shared journal; an update interrupted by the death is rolled back
  (C restored, the rows of P it touched recomputed as P0 + C K), so C and P hold exactly the
  ``applied.sum()`` updates (with staleness 0, the first that many steps of
  sequential SGD on the schedule).
- Hogwild mode: the survivors are asked to stop at their next step and finish the update they are
  writing; the state holds every update they applied plus, possibly, part of the dead worker's last
  one, which is Hogwild's usual contract (racing writes may already leave P off P0 + C K by rounding).

``staleness`` = tau delays each worker's writes by tau of its own steps (an update computed at local
step s is written after local step s + tau is computed), so gradients are taken on weights that miss
at least the worker's tau latest updates; the queue is flushed at the end. Only the vectorised mask
search is used: the tree's maxima would need locks to stay consistent under concurrent writes.
"""

from __future__ import annotations

import math
import queue
import signal
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

    ``seconds`` runs from the moment all workers were released (process start-up excluded) to the
    last worker's end. Steps that did not run have a NaN loss.
    """

    losses: Tensor
    applied: Tensor
    seconds: float


class AsyncWorkerError(RuntimeError):
    """A worker of ``async_sgd`` died or failed; ``result`` holds the losses and applied counts so far.

    Attributes:
        worker: the rank of the worker that failed first.
        exitcode: its exit code (negative: killed by that signal), None if it reported an exception.
        result: what the run did up to the failure; the trainer's state matches ``result.applied``.
    """

    def __init__(self, message: str, worker: int, exitcode: int | None, result: AsyncResult) -> None:
        super().__init__(message)
        self.worker, self.exitcode, self.result = worker, exitcode, result


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
    journal: _Journal | None


@dataclass(frozen=True)
class _Journal:
    """The update in flight and the C entries it overwrites (synchronous mode), to roll it back if its writer dies.

    ``state[0]`` = 1 while an update is being written, ``state[1]`` = its number of (row, col) pairs
    (at most m * S, rows may repeat), ``state[2]`` = the writer's rank, ``state[3]`` = the writer's
    applied count before it. P is not copied (that doubled a step's cost): the rows the update
    touched are recomputed from the restored C on roll-back, P = P0 + C K, equal up to rounding.
    """

    state: Tensor
    pair_rows: Tensor
    pair_cols: Tensor
    c_values: Tensor

    @classmethod
    def allocate(cls, P: Tensor, C: Tensor, batch: int) -> _Journal:
        pairs = P.shape[0] * batch
        return cls(
            state=torch.zeros(4, dtype=torch.long).share_memory_(),
            pair_rows=torch.zeros(pairs, dtype=torch.long).share_memory_(),
            pair_cols=torch.zeros(pairs, dtype=torch.long).share_memory_(),
            c_values=torch.zeros(pairs, dtype=C.dtype).share_memory_(),
        )

    def write(self, s: _Shared, update: Update, rank: int) -> None:
        """Apply ``update`` and count it, so that a death at any instant can be undone by ``roll_back``."""
        k = update.rows.numel()
        self.pair_rows[:k], self.pair_cols[:k] = update.rows, update.cols
        self.c_values[:k] = s.C[update.rows, update.cols]
        self.state[1:] = torch.tensor([k, rank, int(s.applied[rank])])
        self.state[0] = 1  # journal complete: from here on, a death is rolled back
        apply_update(s.P, s.C, s.K, update)
        s.applied[rank] += 1
        self.state[0] = 0

    def roll_back(self, s: _Shared, P0: Tensor) -> bool:
        """Undo a half-written update, if any (``P0``: P before the run); whether there was one."""
        if int(self.state[0]) == 0:
            return False
        k = int(self.state[1])
        rows = self.pair_rows[:k]
        s.C[rows, self.pair_cols[:k]] = self.c_values[:k]  # duplicates restore the same old value
        s.P[rows] = P0[rows] + s.C[rows] @ s.K
        s.applied[int(self.state[2])] = self.state[3]
        self.state[0] = 0
        return True


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
    control,
    errors,
) -> None:
    """Run the global steps rank, rank + workers, ... of the schedule; report failures on ``errors``.

    ``control`` = (ready count, go flag, stop flag), shared with the parent.
    """
    try:
        torch.set_num_threads(1)
        s = shared
        ready, go, stop = control
        pending: deque = deque()
        with ready.get_lock():
            ready.value += 1
        while not go.value:
            if stop.value:
                return
            time.sleep(0.001)
        for t in range(rank, s.schedule.shape[0], workers):
            with cond if synchronous else nullcontext():
                if synchronous:
                    _wait_turn(cond, turn, stop, t, rank, wait)
                if stop.value:
                    return
                pending.append(_one_step(s, s.schedule[t], t, shift, lr))
                if len(pending) > staleness:
                    _write(s, pending.popleft(), rank)
                if synchronous:
                    turn.value = t + 1
                    cond.notify_all()
        while pending and not stop.value:
            with cond if synchronous else nullcontext():
                _write(s, pending.popleft(), rank)
        s.ends[rank] = time.monotonic()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, which re-raises it
        errors.put((rank, traceback.format_exc()))


def _wait_turn(cond, turn, stop, t: int, rank: int, wait: float) -> None:
    """Wait (holding ``cond`` on return) until step ``t`` is this worker's or the parent says stop.

    Polls every 50 ms instead of relying on a notify alone: the parent never notifies (a condition's
    notify blocks forever on a sleeper that was killed), it only sets ``stop``.
    """
    deadline = time.monotonic() + wait
    while turn.value != t and not stop.value:
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker {rank} waited over {wait} s for step {t}")
        cond.wait(0.05)


def _write(s: _Shared, update: Update, rank: int) -> None:
    if s.journal is not None:
        s.journal.write(s, update, rank)
    else:
        apply_update(s.P, s.C, s.K, update)
        s.applied[rank] += 1


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
    """Run the steps of ``schedule`` (T, S input indices) on ``trainer`` with ``workers`` processes.

    The trainer's C and P are updated in place (they are moved to shared memory). Raises
    ``AsyncWorkerError`` (a RuntimeError) naming the worker if one dies or fails, within about a
    second, with the losses so far and a consistent trainer state (see the module docstring); and
    TimeoutError if the run exceeds ``timeout`` seconds. In every case all worker processes are
    stopped and joined first.
    """
    _check_arguments(trainer, schedule, workers, staleness)
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
        journal=_Journal.allocate(trainer.P, trainer.C, schedule.shape[1]) if synchronous else None,
    )
    P0 = trainer.P.clone() if synchronous else None  # to recompute the rows of an interrupted update
    turn, cond, errors = ctx.Value("q", 0), ctx.Condition(), ctx.Queue()
    control = (ctx.Value("i", 0), ctx.Value("b", 0, lock=False), ctx.Value("b", 0, lock=False))
    args = (workers, shared, trainer.shift, trainer.lr, staleness, synchronous, timeout, turn, cond, control, errors)
    procs = [ctx.Process(target=_worker, args=(rank, *args), daemon=True) for rank in range(workers)]
    began = time.monotonic()
    try:
        for proc in procs:
            proc.start()
        _watch(procs, errors, lambda: control[0].value == workers, timeout, "start-up")
        began = time.monotonic()
        control[1].value = 1
        _watch(procs, errors, lambda: False, timeout, "the run")
    except _Failure as failure:
        _stop(procs, control[2])
        rolled = shared.journal.roll_back(shared, P0) if shared.journal is not None else False
        result = AsyncResult(shared.losses.clone(), shared.applied.clone(), time.monotonic() - began)
        raise failure.error(result, rolled, synchronous) from None
    finally:
        _stop(procs, control[2])
    return AsyncResult(shared.losses.clone(), shared.applied.clone(), float(shared.ends.max()) - began)


def _check_arguments(trainer: KronTwoLayerSGD, schedule: Tensor, workers: int, staleness: int) -> None:
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


@dataclass
class _Failure(Exception):
    """A worker failed: its rank, exit code (None for a reported exception) and traceback, if any."""

    worker: int
    exitcode: int | None
    report: str
    phase: str

    def error(self, result: AsyncResult, rolled_back: bool, synchronous: bool) -> AsyncWorkerError:
        if self.exitcode is None:
            how = f"raised an exception:\n{self.report}"
        elif self.exitcode < 0:
            how = f"was killed by signal {signal.Signals(-self.exitcode).name} (exit code {self.exitcode})"
        else:
            how = f"exited with code {self.exitcode}"
        done = int(result.applied.sum())
        state = (
            f"the trainer holds exactly the {done} whole updates applied"
            + (" (one interrupted update was rolled back)" if rolled_back else "")
            if synchronous
            else f"the trainer holds the {done} updates the workers applied (Hogwild: the failed worker's last one may be partial)"
        )
        message = (
            f"asynchronous SGD worker {self.worker} {how} during {self.phase}; the other workers were stopped; "
            f"applied per worker {result.applied.tolist()}; {state}; "
            f"{int((~result.losses.isnan()).sum())} step losses are in error.result.losses."
        )
        return AsyncWorkerError(message, self.worker, self.exitcode, result)


def _watch(procs: list, errors, done, timeout: float, phase: str) -> None:
    """Poll the workers every 10 ms until ``done()`` or all have exited; raise ``_Failure`` at the first failure."""
    deadline = time.monotonic() + timeout
    while not done() and not all(proc.exitcode is not None for proc in procs):
        _raise_reported(errors, phase, 0.0)
        for rank, proc in enumerate(procs):
            if proc.exitcode not in (None, 0):
                _raise_reported(errors, phase, 0.1)  # a traceback it reported says more than its exit code
                raise _Failure(rank, proc.exitcode, "", phase)
        if time.monotonic() > deadline:
            raise TimeoutError(f"asynchronous SGD did not finish {phase} within timeout={timeout} s; raise it or run fewer steps.")
        time.sleep(0.01)
    _raise_reported(errors, phase, 0.0)
    for rank, proc in enumerate(procs):
        if proc.exitcode not in (None, 0):
            raise _Failure(rank, proc.exitcode, "", phase)


def _raise_reported(errors, phase: str, wait: float) -> None:
    """Raise ``_Failure`` for the first traceback a worker put on the error queue, if any."""
    try:
        rank, report = errors.get(timeout=wait) if wait > 0 else errors.get_nowait()
    except queue.Empty:
        return
    raise _Failure(rank, None, report, phase)


def _stop(procs: list, stop) -> None:
    """Ask live workers to stop at their next step (they poll the flag), then join them.

    A worker still alive after 1 s is blocked (on the lock or the notify of a dead peer, so it is
    not writing) and is terminated.
    """
    stop.value = 1
    deadline = time.monotonic() + 1.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
        proc.join()
