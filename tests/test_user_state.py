"""State the user owns: BatchNorm statistics and random draws are not multiplied by hypergradient evaluations,
and a config or data changed after the engine was built is refused, not ignored."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy import bilevel

from betty_like import EngineConfig, ProblemConfig

METHODS = ["unroll", "cg", "neumann", "darts", "sama", "fixed_point"]


def bn_net(p: float = 0.0) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(p), nn.Tanh(), nn.Linear(4, 1))


@pytest.mark.parametrize("method", METHODS)
def test_batchnorm_counts_only_the_forwards_a_plain_step_makes(method):
    net = bn_net()
    config = ProblemConfig(hypergrad=method, iterations=5, on_solver_failure="ignore")
    engine, _, _ = bilevel(config, engine_config=EngineConfig(train_iters=10), inner_module=net)
    engine.run()
    # 10 lower steps, and 10 upper steps whose loss runs the lower module once each
    assert int(net[1].num_batches_tracked) == 20


class RecordingDropout(nn.Module):
    """Dropout that records every mask it draws."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor] = []

    def forward(self, x):
        mask = (torch.rand(x.shape[-1]) > 0.5).to(x.dtype)
        self.masks.append(mask)
        return x * mask * 2.0


@pytest.mark.parametrize("fixed", [False, True])
def test_fixed_randomness_replays_one_random_state_within_a_hypergradient(fixed):
    from betty_like.hypergrad import hypergradient

    torch.manual_seed(1)
    dropout = RecordingDropout()
    net = nn.Sequential(nn.Linear(3, 16), dropout, nn.Tanh(), nn.Linear(16, 1))
    # darts evaluates the lower loss twice per push (w + eps v, w - eps v): with two different dropout masks
    # its finite difference is mostly the difference of the masks
    config = ProblemConfig(hypergrad="darts", fixed_randomness=fixed)
    engine, _, _ = bilevel(config, engine_config=EngineConfig(train_iters=1), inner_module=net)
    engine.run()
    with engine._evaluations.step():  # as the engine computes the upper's step
        hypergradient(engine.program(), "outer")
        dropout.masks.clear()
        hypergradient(engine.program(), "outer")
    own, *pushes = dropout.masks  # the upper's forward, then the lower's loss inside the solve
    assert len(pushes) >= 2
    same = all(torch.equal(m, pushes[0]) for m in pushes)
    assert same == fixed


def test_fixed_randomness_leaves_the_generator_where_a_plain_forward_would():
    net = bn_net(p=0.5)
    config = ProblemConfig(hypergrad="cg", iterations=10, fixed_randomness=True, on_solver_failure="ignore")
    engine, _, _ = bilevel(config, engine_config=EngineConfig(train_iters=1), inner_module=net)
    engine.run()
    from betty_like.hypergrad import hypergradient

    torch.manual_seed(7)
    with engine._evaluations.step():
        hypergradient(engine.program(), "outer")
    after_step = torch.get_rng_state()
    torch.manual_seed(7)
    engine.problems["outer"].training_step(engine._batches["outer"])  # one plain forward
    assert torch.equal(after_step, torch.get_rng_state())


def test_fixed_randomness_must_be_a_bool():
    with pytest.raises(ValueError, match=r"fixed_randomness='yes' is invalid: use True or False"):
        ProblemConfig(fixed_randomness="yes")


def test_a_config_changed_after_the_engine_was_built_is_refused_with_the_field():
    engine, inner, _ = bilevel(ProblemConfig(hypergrad="cg"))
    engine.run(1)
    inner.config.unroll_steps = 0  # bypasses validation: before, a ZeroDivisionError deep inside
    with pytest.raises(ValueError, match=r"problem 'inner': its config changed after the Engine was built \(unroll_steps=0 \(was 1\)\).*build a new Engine"):
        engine.run(1)


def test_a_replaced_config_or_data_is_refused():
    engine, inner, outer = bilevel()
    outer.config = ProblemConfig(step_every=2)
    with pytest.raises(ValueError, match=r"problem 'outer': its config changed.*step_every=2 \(was 1\)"):
        engine.run(1)
    engine, inner, outer = bilevel()
    inner.data = [(torch.zeros(8, 3), torch.zeros(8))]
    with pytest.raises(ValueError, match=r"problem 'inner': its data was replaced after the Engine was built"):
        engine.run(1)
