"""Asynchronous Kronecker SGD with a worker killed by SIGKILL: noticed fast, named, state consistent."""

import importlib
import os
import signal
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp
from test_kron import async_problem

from betty_like.backends.kron import AsyncWorkerError, async_sgd

# workers fork from a server that has imported the backend once: start-up stays well under a second
START = "forkserver"
mp.get_context(START).set_forkserver_preload(["betty_like.backends.kron"])


def _run_and_kill(synchronous: bool, during: str, victim: int = 1, start_method: str = START):
    make, _ = async_problem()
    trainer = make()
    before = (trainer.P.clone(), trainer.C.clone())
    schedule = torch.randint(0, 128, (100_000, 8), generator=torch.Generator().manual_seed(6))  # never finishes
    known = set(mp.active_children())
    out: dict = {}

    def run():
        try:
            async_sgd(trainer, schedule, workers=2, synchronous=synchronous, timeout=60, start_method=start_method)
        except AsyncWorkerError as error:
            out["error"], out["at"] = error, time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    workers: list = []
    while len(workers) < 2 and time.monotonic() < deadline:
        workers = [p for p in mp.active_children() if p not in known]
        time.sleep(0.001)
    workers.sort(key=lambda p: int(p.name.rpartition("-")[2]))  # creation order is rank order
    if during == "the run":
        while not trainer.C.any() and time.monotonic() < deadline:  # C is shared in place: updates show here
            time.sleep(0.005)
        time.sleep(0.1)
    killed = time.monotonic()
    os.kill(workers[victim].pid, signal.SIGKILL)
    thread.join(30)
    assert not thread.is_alive() and "error" in out
    assert not [p for p in mp.active_children() if p in workers]  # survivors stopped and joined
    return out["error"], out["at"] - killed, trainer, make, schedule, before


@pytest.mark.timeout(30)
@pytest.mark.parametrize("synchronous", [True, False], ids=["synchronous", "hogwild"])
def test_a_killed_worker_ends_the_run_fast_naming_it_with_the_losses_so_far(synchronous):
    error, noticed, trainer, make, schedule, _ = _run_and_kill(synchronous, "the run")
    assert noticed < 2.0
    assert error.worker == 1 and error.exitcode == -signal.SIGKILL
    assert "worker 1 was killed by signal SIGKILL" in str(error) and "during the run" in str(error)
    applied = int(error.result.applied.sum())
    recorded = int((~error.result.losses.isnan()).sum())
    assert applied > 0 and recorded >= applied
    if synchronous:  # exactly the first `applied` steps of sequential SGD, whole
        assert not error.result.losses[:applied].isnan().any()
        sequential = make()
        for cols in schedule[:applied]:
            sequential.step(cols)
        torch.testing.assert_close(trainer.C, sequential.C, rtol=0, atol=1e-12)
        # P rows of an update cut off mid-write are recomputed as P0 + C K: equal up to rounding
        torch.testing.assert_close(trainer.P, sequential.P, rtol=0, atol=1e-10)
    else:  # Hogwild: racing writes are its contract (P may be off P0 + C K); the state is usable and trained
        assert torch.isfinite(trainer.P).all() and torch.isfinite(trainer.C).all()
        assert trainer.full_loss().item() < make().full_loss().item()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("synchronous", [True, False], ids=["synchronous", "hogwild"])
def test_a_worker_killed_during_start_up_is_named_and_nothing_is_applied(synchronous):
    # spawn: the workers import torch before they report ready, so the kill surely lands in start-up (a
    # forkserver worker is ready within microseconds and, on a loaded machine, may already be running)
    error, noticed, trainer, _, _, before = _run_and_kill(synchronous, "start-up", victim=0, start_method="spawn")
    assert noticed < 2.0
    assert error.worker == 0 and "during start-up" in str(error) and "SIGKILL" in str(error)
    assert error.result.applied.tolist() == [0, 0] and error.result.losses.isnan().all()
    assert torch.equal(trainer.P, before[0]) and torch.equal(trainer.C, before[1])


def _failing_apply_update(original, fail_at: int):
    """``apply_update`` that, on its ``fail_at``-th call in a process, writes the update's C entries and
    half of its P rows, then raises: a writer dying in the middle of an update."""
    calls = {"n": 0}

    def apply_update(P, C, K, update):
        calls["n"] += 1
        if calls["n"] < fail_at:
            return original(P, C, K, update)
        C.index_put_((update.rows, update.cols), update.coef, accumulate=True)
        half = update.rows.numel() // 2
        P.index_add_(0, update.rows[:half], update.coef[:half, None] * K[update.cols[:half]])
        raise RuntimeError("injected fault after writing part of an update")

    return apply_update


@pytest.mark.timeout(60)
def test_an_update_cut_off_mid_write_is_rolled_back_and_training_continues(monkeypatch):
    """Synchronous mode: a worker raises after writing C and half the P rows of its third update.

    Reference: plain sequential SGD (``trainer.step``) on the same schedule. The workers are forked so
    they inherit the patched writer; worker 0 writes steps 0, 2, 4, so its third update is step 4.
    """
    async_module = importlib.import_module(async_sgd.__module__)
    monkeypatch.setattr(async_module, "apply_update", _failing_apply_update(async_module.apply_update, 3))
    make, schedule = async_problem()
    schedule = schedule[:40]
    trainer = make()
    with pytest.raises(AsyncWorkerError) as info:
        async_sgd(trainer, schedule, workers=2, synchronous=True, timeout=30, start_method="fork")
    error = info.value
    assert error.worker == 0 and error.exitcode is None
    assert "injected fault after writing part of an update" in str(error)
    assert "one interrupted update was rolled back" in str(error)
    assert error.result.applied.tolist() == [2, 2]
    sequential = make()
    for cols in schedule[:4]:
        sequential.step(cols)
    fresh = make()
    assert (trainer.C - fresh.C).abs().max() > 0  # the four whole updates are there
    torch.testing.assert_close(trainer.C, sequential.C, rtol=0, atol=1e-12)
    torch.testing.assert_close(trainer.P, sequential.P, rtol=0, atol=1e-10)

    monkeypatch.undo()  # training continues from the restored state, with healthy workers
    result = async_sgd(trainer, schedule[4:], workers=2, synchronous=True, timeout=30, start_method=START)
    assert result.applied.sum().item() == len(schedule) - 4
    for cols in schedule[4:]:
        sequential.step(cols)
    torch.testing.assert_close(trainer.C, sequential.C, rtol=0, atol=1e-12)
    torch.testing.assert_close(trainer.P, sequential.P, rtol=0, atol=1e-10)


@pytest.mark.timeout(60)
def test_hogwild_run_with_an_update_cut_off_mid_write_ends_named_and_training_continues(monkeypatch):
    """Hogwild keeps its documented contract (a partial last update may stay); the run ends with the
    worker named and the state finite, and a new run trains on from it."""
    async_module = importlib.import_module(async_sgd.__module__)
    monkeypatch.setattr(async_module, "apply_update", _failing_apply_update(async_module.apply_update, 3))
    make, schedule = async_problem()
    trainer = make()
    with pytest.raises(AsyncWorkerError) as info:
        async_sgd(trainer, schedule[:40], workers=2, synchronous=False, timeout=30, start_method="fork")
    error = info.value
    assert error.exitcode is None and "injected fault" in str(error) and "Hogwild" in str(error)
    assert 2 <= error.result.applied.sum().item() <= 4  # each worker applied at most its first two
    assert torch.isfinite(trainer.P).all() and torch.isfinite(trainer.C).all()
    after_fault = trainer.full_loss().item()

    monkeypatch.undo()
    result = async_sgd(trainer, schedule, workers=2, synchronous=False, timeout=30, start_method=START)
    assert result.applied.sum().item() == len(schedule)
    assert trainer.full_loss().item() < after_fault
