"""``unroll_memory="remat"`` / ``"mixed"`` (and checkpointed blocks): the hypergradient of keeping the graph, for far less memory."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig

DTYPE = torch.float64


class Lower(Problem):
    def __init__(self, *args, dropout: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropout = dropout

    def training_step(self, batch):
        x, y = batch
        x = F.dropout(x, self.dropout, training=self.dropout > 0)
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        return (torch.sigmoid(self.upper.module.logits) * losses).mean()


class Upper(Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.lower(x), y)


class Logits(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n, dtype=DTYPE))


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def build(
    memory: str, *, optimizer="sgd", steps=4, hidden=16, dropout=0.0, scheduler=False, iterations=2, n=24, norm=None, **config
):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g)
    net = nn.Sequential(nn.Linear(6, hidden), *([norm(hidden)] if norm else []), nn.Tanh(), nn.Linear(hidden, 3)).to(DTYPE)
    opt = OPTIMIZERS[optimizer](net.parameters())
    lower = Lower(
        "lower", module=net, optimizer=opt, data=[(x, y)], dropout=dropout,
        scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None,
        config=ProblemConfig(unroll_steps=steps, unroll_memory=memory, **config),
    )
    logits = Logits(n)
    upper = Upper("upper", module=logits, optimizer=torch.optim.SGD(logits.parameters(), lr=1.0), data=[(x, y)])
    return Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, EngineConfig(train_iters=iterations * steps))


def run(memory: str, **kwargs):
    engine = build(memory, **kwargs)
    engine.run()
    net = engine.problems["lower"].module
    return engine.status("upper").gradient["upper.logits"], [p.detach().clone() for p in net.parameters()]


CASES = {
    "sgd": {},
    "momentum_wd": {"optimizer": "momentum_wd"},
    "nesterov": {"optimizer": "nesterov"},
    "adam": {"optimizer": "adam"},
    "adamw": {"optimizer": "adamw"},
    "truncate": {"truncate": 2},
    "first_order": {"hypergrad": "first_order"},
    "clip": {"grad_clip": 0.05},
    "scheduler": {"scheduler": True},
    "dropout": {"dropout": 0.3},
}


BLOCKED = ("sgd", "adam", "truncate", "first_order", "clip", "dropout")  # cases also run in checkpointed blocks


@pytest.mark.parametrize(
    ("memory", "every", "case"),
    [(m, None, c) for m in ("remat", "mixed") for c in CASES] + [(m, 3, c) for m in ("remat", "mixed") for c in BLOCKED],
)
def test_lean_steps_equal_keeping_the_graph(memory, every, case):
    # 7 steps in blocks of 3: two full blocks and a partial one
    steps = 4 if every is None else 7
    graph_grad, graph_params = run("graph", steps=steps, **CASES[case])
    lean_grad, lean_params = run(memory, steps=steps, unroll_checkpoint_every=every, **CASES[case])
    assert graph_grad.abs().sum() > 0
    assert float((lean_grad - graph_grad).norm() / graph_grad.norm()) < 1e-12
    for a, b in zip(lean_params, graph_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("memory", ["remat", "mixed"])
def test_dropout_needs_its_random_numbers_replayed(monkeypatch, memory):
    graph_grad, _ = run("graph", dropout=0.3)
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)  # the replay no longer restores the generator
    lean_grad, _ = run(memory, dropout=0.3)
    assert not torch.allclose(lean_grad, graph_grad, rtol=1e-6)


def test_mixed_refuses_batch_norm_in_train_mode_and_takes_it_in_eval_mode():
    with pytest.raises(ValueError, match=r"problem 'lower': unroll_memory='mixed'.*\['lower\.1'\].*eval mode.*'remat'"):
        build("mixed", norm=nn.BatchNorm1d).run()
    engine = build("mixed", norm=nn.BatchNorm1d)
    engine.problems["lower"].module.eval()
    reference = build("graph", norm=nn.BatchNorm1d)
    reference.problems["lower"].module.eval()
    engine.run(), reference.run()
    grad, expected = engine.status("upper").gradient["upper.logits"], reference.status("upper").gradient["upper.logits"]
    assert float((grad - expected).norm() / expected.norm()) < 1e-12


def test_checkpoint_every_needs_a_lean_mode():
    with pytest.raises(ValueError, match=r"unroll_checkpoint_every=3 is invalid: .*unroll_memory='remat' or 'mixed'"):
        ProblemConfig(unroll_checkpoint_every=3)
    with pytest.raises(ValueError, match=r"unroll_checkpoint_every=0 is invalid: use an integer >= 1"):
        ProblemConfig(unroll_memory="remat", unroll_checkpoint_every=0)


class SavedBytes:
    """Live and peak bytes of the storages autograd holds for backward passes (saved-tensor hooks)."""

    def __init__(self) -> None:
        self.refs: dict[int, int] = {}
        self.live = self.peak = 0

    def pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if self.refs.get(key, 0) == 0:
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1
        return _Saved(self, key, storage.nbytes(), t.detach())  # no grad_fn: a saved output would form a cycle

    def release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= nbytes


class _Saved:
    def __init__(self, owner: SavedBytes, key: int, nbytes: int, tensor) -> None:
        self.owner, self.key, self.nbytes, self.tensor = owner, key, nbytes, tensor

    def __del__(self) -> None:
        self.owner.release(self.key, self.nbytes)


def saved_peak(memory: str, steps: int = 30, **kwargs) -> tuple[int, int]:
    """(peak bytes saved for backward over a full window and the upper step that consumes it, weight bytes)."""
    engine = build(memory, steps=steps, iterations=1, **kwargs)
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda saved: saved.tensor):
        engine.run()
    weights = sum(p.numel() * p.element_size() for p in engine.problems["lower"].module.parameters())
    return counter.peak, weights


def test_remat_keeps_a_fraction_of_the_graph_at_30_steps():
    # activation-heavy: batch 256, 256 hidden units; the peak includes the replay inside the backward pass
    graph, _ = saved_peak("graph", hidden=256, n=256)
    remat, _ = saved_peak("remat", hidden=256, n=256)
    assert remat <= 0.3 * graph, (remat, graph)


def test_checkpointed_blocks_keep_less_than_one_copy_of_the_weights_per_step():
    # weight-heavy: batch 4, 512 hidden units, momentum state; 30 steps in blocks of 5
    remat, weights = saved_peak("remat", hidden=512, n=4, optimizer="momentum_wd")
    blocks, _ = saved_peak("remat", hidden=512, n=4, optimizer="momentum_wd", unroll_checkpoint_every=5)
    assert remat >= 30 * weights  # every step keeps its weights (and momentum)
    assert blocks < 0.5 * 30 * weights, (blocks, weights)


@pytest.mark.parametrize("memory", ["remat", "mixed"])
def test_a_lean_level_in_a_chain_keeps_every_gradient_path(memory):
    # top -> mid (unrolled through its own hypergradient steps, lean) -> low (cg), and
    # top -> mid (unrolled, graph) -> low (unrolled, lean); closed form from nested solves.
    # mixed cannot take a middle level (refused below): only the second chain runs with it
    from betty_like.testing.nested import three_level_chain

    chains = [({"low": "cg", "mid": "unroll"}, "mid")] if memory == "remat" else []
    for mixes, lean in [*chains, ({"low": "unroll", "mid": "unroll"}, "low")]:
        grads = {}
        for mode in ("graph", memory):
            case = three_level_chain(mixes, configs={lean: {"unroll_memory": mode}})
            case.engine.run()
            grads[mode] = case.engine.status("top").gradient
        for key, value in grads["graph"].items():
            # summation order differs in the replayed steps: 3e-11 measured after 23 nested steps
            torch.testing.assert_close(grads[memory][key], value, rtol=1e-9, atol=1e-12)
            exact = case.exact["top"][key]
            assert float((grads[memory][key] - exact).norm() / exact.norm()) < 1e-6


def test_lean_steps_above_unrolled_steps_are_refused_with_the_fixes():
    from betty_like.testing.nested import three_level_chain

    with pytest.raises(ValueError, match=r"problem 'mid': unroll_memory='remat'.*\['low'\].*unroll_memory='graph'"):
        three_level_chain({"low": "unroll", "mid": "unroll"}, configs={"mid": {"unroll_memory": "remat"}})
    with pytest.raises(ValueError, match=r"problem 'mid': unroll_memory='mixed'.*\['low'\].*unroll_memory='remat'"):
        three_level_chain({"low": "cg", "mid": "unroll"}, configs={"mid": {"unroll_memory": "mixed"}})
    with pytest.raises(ValueError, match=r"problem 'low': unroll_checkpoint_every=2 .*\['mid'\].*None"):
        three_level_chain(
            {"low": "unroll", "mid": "unroll"}, configs={"low": {"unroll_memory": "remat", "unroll_checkpoint_every": 2}}
        )
