"""Checkpoints: k iterations + resume + N - k equals N straight, bit for bit; unusable files fail clearly.

The bilevel program draws dropout in every loss evaluation (inside hypergradients too), keeps Adam
and momentum state and a scheduler, and reads list data, so any lost RNG state, counter, optimizer
or data position shows up as a difference.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_resume import Inner, Outer, assert_identical, snapshot
from test_trilevel import Low, Mid, Top
from toy import Scale, batches

from betty_like import Engine, EngineConfig, ProblemConfig
from betty_like.checkpoint import CheckpointError, checkpoints, load, save
from betty_like.testing.closed_form import Scalar, linear, regression_data

N = 10


def bilevel(method: str, problem: dict | None = None, **engine) -> Engine:
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    scale = Scale()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    inner = Inner(
        "inner", module=net, optimizer=optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5),
        data=batches(3), config=ProblemConfig(hypergrad=method, unroll_steps=2, iterations=20, tol=1e-30, **(problem or {})),
    )
    outer = Outer(
        "outer", module=scale, optimizer=torch.optim.SGD(scale.parameters(), lr=0.05, momentum=0.9), data=batches(2, seed=1)
    )
    config = EngineConfig(**{"train_iters": N, "seed": 5, **engine})
    return Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}, config)


def trilevel(**engine) -> Engine:
    d = 3
    low_m, mid_m, top_m = linear(d, torch.zeros(d)), linear(d, torch.full((d,), 0.1)), Scalar(torch.tensor(0.3))
    low = Low("low", module=low_m, optimizer=torch.optim.Adam(low_m.parameters(), lr=0.05),
              data=[regression_data(20, d, seed=s) for s in (1, 2, 3)], config=ProblemConfig(hypergrad="cg", iterations=30))
    mid = Mid("mid", module=mid_m, optimizer=torch.optim.SGD(mid_m.parameters(), lr=0.05, momentum=0.5),
              data=[regression_data(20, d, seed=s) for s in (4, 5)],
              config=ProblemConfig(hypergrad="cg", iterations=30, unroll_steps=2))
    top = Top("top", module=top_m, optimizer=torch.optim.SGD(top_m.parameters(), lr=0.05), data=[regression_data(20, d, seed=6)])
    config = EngineConfig(**{"train_iters": N, "seed": 3, **engine})
    return Engine([top, mid, low], {"u2l": {top: [mid], mid: [low]}, "l2u": {low: [mid], mid: [top]}}, config)


def losses(engine):
    return [(row["iteration"], row["problem"], row["loss"]) for row in engine.history]


@pytest.mark.parametrize(
    ("build", "k", "saved_at"),
    [
        (lambda **c: bilevel("cg", **c), 5, 5),  # implicit: no window, saved when due
        (lambda **c: bilevel("neumann", {"damping": 3.0}, **c), 5, 5),  # the kept curvature estimate resumes too
        (lambda **c: bilevel("unroll", **c), 5, 6),  # unrolled: due at 5 with a window open, saved at 6 (closed)
        (trilevel, 4, 4),
    ],
    ids=["cg", "neumann", "unroll", "three-level"],
)
def test_k_then_resume_then_the_rest_equals_a_straight_run_bit_for_bit(tmp_path, build, k, saved_at):
    straight = build(log_every=1)
    straight.run()
    first = build(log_every=1, checkpoint_every=k, checkpoint_dir=str(tmp_path))
    first.run(iterations=saved_at + 1)  # runs past the checkpoint: those steps are lost and redone
    assert [p.name for p in checkpoints(tmp_path)] == [f"ckpt-{saved_at:08d}.pt"]
    resumed = build(log_every=1, checkpoint_dir=str(tmp_path), resume="latest")
    resumed.run()
    assert resumed.iteration == N
    assert_identical(snapshot(resumed), snapshot(straight))
    assert losses(resumed) == losses(straight)
    for name in straight.problems:
        assert resumed.status(name).steps == straight.status(name).steps


def test_a_resumed_run_logs_the_same_rows_as_a_straight_one(tmp_path):
    import csv

    def table(path):
        with open(path, newline="") as f:
            return [r for r in csv.DictReader(f) if not r["tag"].startswith(("time/", "memory/"))]

    logs = {"log_every": 1, "logger": "csv", "progress": False}
    bilevel("cg", log_dir=str(tmp_path / "straight"), **logs).run()
    died = bilevel("cg", log_dir=str(tmp_path / "resumed"), checkpoint_every=4, checkpoint_dir=str(tmp_path / "c"), **logs)
    died.run(iterations=6)  # rows 5 and 6 are written, then lost with the process
    bilevel("cg", log_dir=str(tmp_path / "resumed"), checkpoint_dir=str(tmp_path / "c"), resume="latest", **logs).run()
    assert table(tmp_path / "resumed" / "metrics.csv") == table(tmp_path / "straight" / "metrics.csv")


def test_keeps_the_newest_and_saving_with_an_open_window_warns_that_history_is_cut(tmp_path, caplog):
    engine = bilevel("cg", checkpoint_every=2, keep_checkpoints=2, checkpoint_dir=str(tmp_path))
    engine.run()
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt-00000008.pt", "ckpt-00000010.pt"]
    engine = bilevel("unroll")
    engine.run(iterations=3)
    assert engine.status("inner").window_open
    save(engine, tmp_path / "open.pt")
    assert "cuts the differentiable history" in caplog.text
    again = bilevel("unroll")
    load(again, tmp_path / "open.pt")
    assert again.status("inner").window_open and again.iteration == 3
    again.run()  # continues (not bit-identical to a straight run: the window's history was cut)
    assert again.iteration == N


def test_a_corrupt_or_truncated_file_names_itself(tmp_path):
    engine = bilevel("cg", checkpoint_every=2, checkpoint_dir=str(tmp_path))
    engine.run(iterations=4)
    good, last = checkpoints(tmp_path)
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=rf"checkpoint {last} cannot be read, it is truncated or corrupt"):
        bilevel("cg", resume=str(last)).run()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"checkpoint {garbage} cannot be read"):
        load(bilevel("cg"), garbage)
    load(bilevel("cg"), good)  # the previous one is untouched


def test_a_checkpoint_of_another_program_says_what_differs(tmp_path):
    engine = bilevel("cg")
    engine.run(iterations=2)
    path = save(engine, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} was written for a different program: configs.inner.hypergrad: checkpoint 'cg', this program 'neumann'"):
        load(bilevel("neumann"), path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} was written for a different program: .*problems"):
        load(trilevel(), path)
    used = bilevel("cg")
    used.run(iterations=1)
    with pytest.raises(CheckpointError, match="load it into a freshly built engine"):
        load(used, path)


CHILD = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import betty_like.checkpoint as checkpoint
    from test_checkpoint import bilevel

    real_fsync = os.fsync
    saves = 0
    def slow_fsync(fd):
        global saves
        if os.path.basename(os.readlink(f"/proc/self/fd/{{fd}}")).endswith(".tmp"):
            saves += 1
            if saves == 3:  # the third save: half written, then killed
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                print("SAVING", flush=True)
                time.sleep(60)
        real_fsync(fd)
    checkpoint.os.fsync = slow_fsync
    bilevel("cg", checkpoint_every=2, checkpoint_dir={directory!r}).run()
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to spot the checkpoint's file descriptor")
def test_a_process_killed_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    script = CHILD.format(tests=str(Path(__file__).parent), directory=str(directory))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "SAVING"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert [p.name for p in checkpoints(directory)] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    assert any(p.name.endswith(".tmp") for p in directory.iterdir())  # the half-written one, ignored
    straight = bilevel("cg")
    straight.run()
    resumed = bilevel("cg", checkpoint_dir=str(directory), resume="latest")
    resumed.run()  # loses only the steps since iteration 4
    assert_identical(snapshot(resumed), snapshot(straight))
    time.sleep(0)
