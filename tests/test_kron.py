"""Kronecker backend: factored layer = dense, implicit SGD = dense SGD, async SGD converges, loses nothing."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from betty_like.backends.kron import (
    DenseTwoLayerSGD,
    KronData,
    KroneckerLinear,
    KronTwoLayerSGD,
    MaskSearch,
    TreeSearch,
    async_sgd,
)

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def unit_factors(n, p, q, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    U = F.normalize(torch.randn(n, p, generator=g, dtype=F64), dim=1)
    V = F.normalize(torch.randn(n, q, generator=g, dtype=F64), dim=1)
    return KronData(U.to(device), V.to(device))


def problem(n=96, p=6, q=7, m=400, rank=2, seed=0, device="cpu"):
    data = unit_factors(n, p, q, seed, device)
    g = torch.Generator().manual_seed(seed + 1)
    y = (torch.randint(0, 2, (n,), generator=g, dtype=F64) - 0.5).to(device)
    layer = KroneckerLinear(p, q, m, rank=rank, bias=False, std=1.0, dtype=F64, generator=g).to(device)
    signs = (torch.randint(0, 2, (m,), generator=g, dtype=F64) * 2 - 1).to(device)
    return data, y, layer, signs


def test_kron_data_matches_torch_kron_and_gram():
    data = unit_factors(5, 3, 4)
    X = data.materialize()
    for i in range(data.n):
        torch.testing.assert_close(X[i], torch.kron(data.U[i], data.V[i]), rtol=0, atol=0)
    torch.testing.assert_close(data.gram(), X @ X.T, rtol=1e-12, atol=1e-12)
    other = unit_factors(3, 3, 4, seed=1)
    torch.testing.assert_close(data.gram(other), X @ other.materialize().T, rtol=1e-12, atol=1e-12)


def test_kron_data_rejects_mismatched_factors():
    with pytest.raises(ValueError, match="number of inputs"):
        KronData(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="2-D"):
        KronData(torch.zeros(3), torch.zeros(3, 2))
    with pytest.raises(TypeError, match="dtype"):
        KronData(torch.zeros(3, 2), torch.zeros(3, 2, dtype=F64))


@pytest.mark.parametrize("rank", [1, 3])
def test_kronecker_linear_equals_dense_outputs_and_gradients(rank):
    torch.manual_seed(0)
    layer = KroneckerLinear(5, 6, 7, rank=rank, bias=True, dtype=F64)
    with torch.no_grad():
        layer.bias.normal_()
    u = torch.randn(4, 5, dtype=F64, requires_grad=True)
    v = torch.randn(4, 6, dtype=F64, requires_grad=True)
    x = (u[:, :, None] * v[:, None, :]).reshape(4, 30)
    params = [layer.weight_u, layer.weight_v, layer.bias, u, v]

    fast = layer(u, v)
    dense = F.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(fast, dense, rtol=1e-12, atol=1e-12)
    # Compare with nn.Linear holding the materialised weight as well.
    linear = torch.nn.Linear(30, 7, dtype=F64)
    with torch.no_grad():
        linear.weight.copy_(layer.dense_weight())
        linear.bias.copy_(layer.bias)
    torch.testing.assert_close(fast, linear(x), rtol=1e-12, atol=1e-12)

    target = torch.randn(4, 7, dtype=F64)
    g_fast = torch.autograd.grad(((fast - target) ** 2).sum(), params, create_graph=True)
    g_dense = torch.autograd.grad(((dense - target) ** 2).sum(), params, create_graph=True)
    for a, b in zip(g_fast, g_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    # Double backward (hypergradients go through it).
    gg_fast = torch.autograd.grad(sum((g**2).sum() for g in g_fast), params)
    gg_dense = torch.autograd.grad(sum((g**2).sum() for g in g_dense), params)
    for a, b in zip(gg_fast, gg_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_kronecker_linear_rejects_wrong_factor_lengths():
    layer = KroneckerLinear(3, 4, 2)
    with pytest.raises(ValueError, match=r"\(p, q\) = \(3, 4\)"):
        layer(torch.zeros(1, 4), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="rank"):
        KroneckerLinear(3, 4, 2, rank=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("search", ["mask", "tree"])
def test_implicit_sgd_equals_dense_sgd_iterates(search, device):
    data, y, layer, signs = problem(device=device)
    ours = KronTwoLayerSGD(data, y, layer, signs, lr=2.0, search=search)
    dense = DenseTwoLayerSGD(data, y, layer, signs, lr=2.0)
    g = torch.Generator().manual_seed(3)
    active = 0
    for _ in range(120):
        cols = torch.randint(0, data.n, (8,), generator=g).to(device)
        a, b = ours.step(cols), dense.step(cols)
        assert abs(a.loss.item() - b.loss.item()) <= 1e-10
        assert (a.pred - b.pred).abs().max().item() <= 1e-10
        active += int((ours.P[:, cols] > ours.shift).sum())
    assert 0 < active < 120 * 8 * 400 / 4  # the threshold leaves a minority of neurons active
    assert (ours.dense_weight() - dense.linear.weight).abs().max().item() <= 1e-10
    fresh = unit_factors(10, 6, 7, seed=9, device=device)
    torch.testing.assert_close(ours.predict(fresh), dense.forward(fresh.materialize()), rtol=0, atol=1e-10)


def test_tree_search_finds_exactly_the_masked_pairs_after_updates():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(37, 11, generator=g, dtype=F64)
    mask, tree = MaskSearch(values), TreeSearch(values)
    for threshold in (-0.5, 1.0, 2.0, 5.0):
        for _ in range(5):
            rows = torch.randperm(37, generator=g)[:6]
            change = torch.randn(6, 11, generator=g, dtype=F64)
            for s in (mask, tree):
                s.values[rows] += change
                s.refresh(rows)
            cols = torch.randint(0, 11, (4,), generator=g)
            got = set(zip(*(t.tolist() for t in tree.query(cols, threshold)), strict=True))
            want = set(zip(*(t.tolist() for t in mask.query(cols, threshold)), strict=True))
            assert got == want


def test_trainer_rejects_bad_arguments():
    data, y, layer, signs = problem(m=20)
    with pytest.raises(ValueError, match="search='heap'"):
        KronTwoLayerSGD(data, y, layer, signs, lr=1.0, search="heap")
    with pytest.raises(ValueError, match="bias=False"):
        KronTwoLayerSGD(data, y, KroneckerLinear(6, 7, 20, dtype=F64), signs, lr=1.0)
    with pytest.raises(ValueError, match="one per neuron"):
        KronTwoLayerSGD(data, y, layer, signs[:5], lr=1.0)
    with pytest.raises(ValueError, match="lr"):
        KronTwoLayerSGD(data, y, layer, signs, lr=0.0)


def async_problem():
    data, y, layer, signs = problem(n=128, p=8, q=8, m=512, rank=1, seed=4)
    schedule = torch.randint(0, data.n, (300, 8), generator=torch.Generator().manual_seed(5))
    return (lambda search="mask": KronTwoLayerSGD(data, y, layer, signs, lr=20.0, search=search)), schedule


@pytest.mark.timeout(60)
def test_synchronous_mode_applies_every_update_like_sequential_sgd():
    make, schedule = async_problem()
    sequential = make()
    for cols in schedule:
        sequential.step(cols)
    shared = make()
    result = async_sgd(shared, schedule, workers=2, staleness=0, synchronous=True, timeout=50)
    assert result.applied.tolist() == [150, 150]
    torch.testing.assert_close(shared.P, sequential.P, rtol=0, atol=1e-12)
    torch.testing.assert_close(shared.C, sequential.C, rtol=0, atol=1e-12)
    # Every update is in C, and P is consistent with it: P = P0 + C K.
    P0 = make().P
    torch.testing.assert_close(shared.P, P0 + shared.C @ shared.K, rtol=0, atol=1e-10)


@pytest.mark.timeout(60)
def test_lock_free_workers_with_staleness_converge():
    make, schedule = async_problem()
    trainer = make()
    start = trainer.full_loss().item()
    result = async_sgd(trainer, schedule, workers=2, staleness=2, timeout=50)
    assert result.applied.sum().item() == schedule.shape[0]
    assert not torch.isnan(result.losses).any()
    assert start > 0.1
    assert trainer.full_loss().item() < 0.01


@pytest.mark.timeout(60)
def test_worker_failure_is_raised_and_processes_are_joined():
    make, schedule = async_problem()
    bad = schedule.clone()
    bad[7, 0] = 10_000  # out of range: the worker owning step 7 fails
    with pytest.raises(RuntimeError, match="worker 1"):
        async_sgd(make(), bad, workers=2, timeout=50)


def test_async_rejects_bad_configuration():
    make, schedule = async_problem()
    with pytest.raises(ValueError, match="workers"):
        async_sgd(make(), schedule, workers=0)
    with pytest.raises(ValueError, match="staleness"):
        async_sgd(make(), schedule, staleness=-1)
    with pytest.raises(ValueError, match="search='mask'"):
        async_sgd(make("tree"), schedule)


@pytest.mark.timeout(300)
def test_bilevel_threshold_learning_on_digit_pairs():
    """The upper level moves b by unrolled hypergradients and beats the same program with b fixed."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    from kron_pairs import learn_threshold

    result = learn_threshold(iters=150, m=128, start=1.5)
    assert abs(result["shift"] - 1.5) > 0.05  # the hypergradient reached b
    assert result["baseline"]["shift"] == 1.5  # threshold_lr=0 really keeps b fixed
    assert result["valid_loss"] < result["baseline"]["valid_loss"]
    assert result["valid_loss"] < 0.45  # predicting 0 for labels +-1 gives 0.5
