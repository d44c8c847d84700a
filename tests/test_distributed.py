"""Two gloo processes on 127.0.0.1 give the one-process hypergradients on the same global batch.

The ranks run ``tests/dist_worker.py`` as subprocesses (with a timeout, so a hang fails instead of
blocking the suite); the reference is the same program in this process. The batches have an odd size,
so the shards are unequal (51 / 50 and 50 / 49).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import dist_worker
import pytest
import torch

METHODS = list(dist_worker.CONFIGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    worker = str(Path(dist_worker.__file__))
    processes = [
        subprocess.Popen(
            [sys.executable, worker, str(r), "2", port, str(out / f"{r}.pt"), *METHODS],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=600)[0].decode() for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, text in zip(processes, outputs, strict=True):
        assert p.returncode == 0, text[-3000:]
    return [torch.load(out / f"{r}.pt") for r in range(2)]


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process_on_the_global_batch(ranks, method):
    reference = dist_worker.run(method, distributed=False)
    for rank in ranks:
        got = rank[method]["gradients"]
        scale = reference["gradients"].abs().max()
        error = (got - reference["gradients"]).abs().max() / scale
        print(f"{method}: relative error {error:.3g}")
        assert error < 1e-5, f"{method}: relative error {error:.3g} over {dist_worker.ITERATIONS} iterations"


@pytest.mark.parametrize("method", METHODS)
def test_parameters_stay_bit_identical_across_ranks(ranks, method):
    first, second = ranks[0][method]["params"], ranks[1][method]["params"]
    assert all(torch.equal(first[k], second[k]) for k in first)
