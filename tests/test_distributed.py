"""Two gloo processes on 127.0.0.1 give the one-process hypergradients on the same global batch.

The ranks run ``tests/dist_worker.py`` as subprocesses (with a timeout, so a hang fails instead of
blocking the suite); the reference is the same program in this process. The batches have an odd size,
so the shards are unequal (51 / 50 and 50 / 49).
"""

import logging
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import dist_worker
import pytest
import torch
import torch.distributed as dist
from toy import bilevel

from betty_like import ProblemConfig
from betty_like.hypergrad import LinearSystem

METHODS = list(dist_worker.CONFIGS)
THREE_LEVELS = [f"{m}/3" for m in METHODS]
BETTY = ["cg/betty", "neumann/betty"]
SCENARIOS = [*METHODS, "cg/masked", "fixed_point/adam", "fixed_point/adam*2", *BETTY, "policies"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(scenarios: list[str], out: Path) -> list[dict]:
    """Two ranks running ``scenarios``; their results."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    worker = str(Path(dist_worker.__file__))
    processes = [
        subprocess.Popen(
            [sys.executable, worker, str(r), "2", port, str(out / f"{r}.pt"), *scenarios],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    try:  # a rank left waiting in a collective fails after the worker's 120 s gloo timeout, or is killed here
        outputs = [p.communicate(timeout=900)[0].decode() for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, text in zip(processes, outputs, strict=True):
        assert p.returncode == 0, text[-3000:]
    return [torch.load(out / f"{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(SCENARIOS, tmp_path_factory.mktemp("ranks"))


@pytest.fixture(scope="module")
def three_level_ranks(tmp_path_factory):
    return spawn(THREE_LEVELS, tmp_path_factory.mktemp("three"))


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference over the reference's largest entry (the difference itself where that is 0:
    first_order at three levels, whose top gradient is exactly zero here)."""
    size = reference.abs().max()
    return float((got - reference).abs().max() / (size if size > 0 else 1.0))


def check_equal_to_one_process(ranks: list[dict], scenario: str) -> None:
    reference = dist_worker.run(scenario.partition("*")[0], distributed=False)
    for rank in ranks:
        error = relative_error(rank[scenario]["gradients"], reference["gradients"])
        print(f"{scenario}: relative error {error:.3g}")
        assert error < 1e-5, f"{scenario}: relative error {error:.3g} over {dist_worker.ITERATIONS} iterations"
    first, second = ranks[0][scenario]["params"], ranks[1][scenario]["params"]
    assert all(torch.equal(first[k], second[k]) for k in first), "parameters differ across ranks"


@pytest.mark.parametrize("scenario", METHODS)
def test_two_ranks_equal_one_process_and_each_other(ranks, scenario):
    check_equal_to_one_process(ranks, scenario)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", THREE_LEVELS)
def test_two_ranks_equal_one_process_and_each_other_at_three_levels(three_level_ranks, scenario):
    check_equal_to_one_process(three_level_ranks, scenario)


@pytest.mark.parametrize("scenario", BETTY)
def test_betty_average_at_the_end_fails_the_same_check(ranks, scenario):
    """Each rank solving its own system (Betty's data parallel) is far from the one-process hypergradient."""
    reference = dist_worker.run(scenario.split("/")[0], distributed=False)
    errors = [relative_error(rank[scenario]["gradients"], reference["gradients"]) for rank in ranks]
    print(f"{scenario}: relative error {errors[0]:.3g}")
    assert min(errors) > 1e-2


def test_a_rank_with_a_zero_cotangent_still_takes_part_in_the_solve(ranks):
    """Rank 1's validation examples weigh 0: its cotangent is exactly zero, the other rank's is not.

    A rank that skipped its push on its own zero would leave the other waiting in the solve's
    all-reduces (the worker's gloo timeout turns that hang into a failure).
    """
    reference = dist_worker.run("cg/masked", distributed=False)
    for rank in ranks:
        assert relative_error(rank["cg/masked"]["gradients"], reference["gradients"]) < 1e-5


def test_only_rank_zero_logs_shows_progress_and_checkpoints_and_every_rank_resumes(ranks):
    first, second = ranks[0]["policies"], ranks[1]["policies"]
    assert first["files"] == ["ckpt/ckpt-00000003.pt", "ckpt/ckpt-00000006.pt", "logs/metrics.csv"]
    assert second["files"] == []
    assert first["progress"] and not second["progress"]
    for rank in (first, second):  # resumed at iteration 3 from rank 0's checkpoint: bit-identical to no break
        assert all(torch.equal(rank["resumed"][k], rank["params"][k]) for k in rank["params"])
    assert all(torch.equal(first["params"][k], second["params"][k]) for k in first["params"])


@pytest.fixture
def one_rank():
    """A gloo group of one process: data parallel is on, with one rank."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fixed_point_with_adam_and_weight_decay_equals_one_process(ranks):
    """fixed_point differentiates the optimizer's update, taken at the global gradient on every rank: exact
    for an update that is not affine in the gradient (each rank's update of its own gradient was not)."""
    check_equal_to_one_process(ranks, "fixed_point/adam")


def test_micro_batches_on_every_rank_equal_one_process(ranks):
    """Two ranks, each splitting its shard into two micro-batches: the derivatives are averaged over ranks
    there too (fixed_point, taking the update of the global gradient, would see each rank's own otherwise)."""
    check_equal_to_one_process(ranks, "fixed_point/adam*2")


@pytest.mark.parametrize("hypergrad", ["cg", "unroll"])
def test_the_loss_audit_sees_which_problems_an_averaged_loss_reads(one_rank, caplog, hypergrad):
    """Under data parallel every loss reads its parameters through averaging nodes (one per problem): the audit, which tells
    the problems a loss reads by node, must still see the inner loss reading the outer one (no false
    "ignores" warning, no false "reads a problem it has no edge to" error)."""
    engine, outer, inner = bilevel(ProblemConfig(hypergrad=hypergrad))
    with caplog.at_level(logging.WARNING, logger="betty_like"):
        engine.run(3)
    assert not [r.message for r in caplog.records if "does not depend on the parameters" in r.message]
    assert engine.status("outer").steps > 0


@pytest.mark.parametrize("scenario", ["cg/3", "neumann/3"])
def test_data_parallel_solves_what_one_process_solves_at_three_levels(one_rank, monkeypatch, scenario):
    """Averaged reads must not tie one problem's derivative to another's: with one node over all problems
    a top step under data parallel ran two adjoint solves more than one process (through the lowest level's
    push, whose cotangent came out of the node that also held the top's parameter), adding exact zeros."""
    counts = {"solves": 0, "products": 0}
    solve = LinearSystem.solve

    def counted(system, b):
        def matvec(u, create_graph):
            counts["products"] += 1
            return system.matvec(u, create_graph)

        counts["solves"] += 1
        return solve(replace(system, matvec=matvec), b)

    monkeypatch.setattr(LinearSystem, "solve", counted)
    work = []
    for distributed in (True, False):
        engine, _ = dist_worker.build(scenario, distributed, accumulate=1 if distributed else 2)
        counts.update(solves=0, products=0)
        engine.run(2)  # the top steps in the second iteration
        assert engine.status("top").steps == 1
        work.append(dict(counts))
    assert work[0] == work[1]


def test_kfac_is_refused_under_data_parallel(one_rank):
    with pytest.raises(ValueError, match=r"problem 'inner': hypergrad='kfac' cannot run under data parallel.*use hypergrad='cg'"):
        bilevel(ProblemConfig(hypergrad="kfac"))


def test_captured_and_rematerialized_steps_are_refused_under_data_parallel(one_rank):
    with pytest.raises(ValueError, match="execution='compiled' cannot run under data parallel"):
        bilevel(ProblemConfig(execution="compiled"))
    with pytest.raises(ValueError, match="unroll_memory='remat'.*data-parallel all-reduce"):
        bilevel(ProblemConfig(unroll_memory="remat"))


@pytest.fixture
def one_thread():
    """The ranks run with OMP_NUM_THREADS=1: a float32 matmul split over threads rounds differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_equal_to_micro_batches(ranks: list[dict], scenario: str) -> None:
    """Both ranks' upper gradients of all iterations and final parameters against one process with
    ``accumulate_steps=2`` on every problem: bit for bit (docs/distributed.md, "Micro-batches in one process")."""
    reference = dist_worker.run(scenario, distributed=False, accumulate=2)
    for rank in ranks:
        difference = float((rank[scenario]["gradients"] - reference["gradients"]).abs().max())
        params = max(float((rank[scenario]["params"][k] - v).abs().max()) for k, v in reference["params"].items())
        print(f"{scenario}: gradient difference {difference:.3g}, parameter difference {params:.3g}")
        assert difference == 0.0 and params == 0.0


@pytest.mark.parametrize("scenario", METHODS)
def test_two_ranks_equal_one_process_with_two_micro_batches(ranks, one_thread, scenario):
    check_equal_to_micro_batches(ranks, scenario)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", THREE_LEVELS)
def test_two_ranks_equal_one_process_with_two_micro_batches_at_three_levels(three_level_ranks, one_thread, scenario):
    check_equal_to_micro_batches(three_level_ranks, scenario)
