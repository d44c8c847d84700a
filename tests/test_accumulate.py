"""``ProblemConfig(accumulate_steps=n)``: the loss of each batch as the sum of its data-parallel shards' losses.

Closed-form ridge regression in float64: the hypergradient with micro-batches is the whole-batch one
(``torch.linalg.solve``), and the one of ``accumulate_steps=1`` to rounding. The comparison with two gloo
ranks is in ``tests/test_distributed.py`` (it reuses that file's spawned ranks).
"""

import pytest
import torch

from betty_like import ProblemConfig
from betty_like.testing.closed_form import ridge

SETTINGS = {
    "cg": {},
    "neumann": {},
    "fixed_point": {},
    "unroll": {"unroll_steps": 5},
    "first_order": {},
    "darts": {},
    "sama": {},
}
IMPLICIT = ["cg", "neumann", "fixed_point"]


def hypergradient(method: str, **config) -> tuple[torch.Tensor, torch.Tensor]:
    case = ridge(method, **SETTINGS[method], **config)
    case.engine.run()
    return case.engine.status(case.upper).gradient[f"{case.upper}.value"], case.exact


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("method", SETTINGS)
def test_micro_batches_give_the_whole_batch_hypergradient(method, parts):
    """40 examples in 20/20 or 14/13/13 shards: the implicit methods reach the closed form, every method its
    own ``accumulate_steps=1`` value (a sum over shards of share-scaled means is the mean)."""
    whole, exact = hypergradient(method)
    got, _ = hypergradient(method, accumulate_steps=parts)
    assert float((got - whole).abs() / whole.abs()) < 1e-13
    if method in IMPLICIT:
        assert float((got - exact).abs() / exact.abs()) < 1e-10


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "2", None])
def test_accumulate_steps_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match=rf"ProblemConfig\.accumulate_steps={value!r} is invalid: use an integer >= 1"):
        ProblemConfig(accumulate_steps=value)


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"execution": "compiled"}, "execution='compiled' is invalid: with accumulate_steps=2 a captured step runs the whole batch"),
        ({"execution": "auto"}, "execution='auto' is invalid: with accumulate_steps=2 .*use execution='eager'"),
        ({"compile_hypergrad": True}, "compile_hypergrad=True is invalid: .*compiled Hessian-vector products take the whole batch"),
        ({"hypergrad": "cg", "curvature": "gauss_newton"}, "curvature='gauss_newton' is invalid: .*use curvature='hessian'"),
        ({"hypergrad": "kfac"}, "hypergrad='kfac' is invalid: .*use hypergrad='cg'"),
    ],
)
def test_what_takes_the_whole_batch_is_refused_with_micro_batches(settings, words):
    with pytest.raises(ValueError, match=rf"ProblemConfig\.{words}.*or accumulate_steps=1"):
        ProblemConfig(accumulate_steps=2, **settings)
    ProblemConfig(accumulate_steps=1, **settings)  # the whole batch: fine


def test_a_batch_without_a_batch_dimension_cannot_be_split():
    case = ridge("cg", accumulate_steps=2)
    case.engine.problems["inner"].data[0] = (torch.tensor(1.0), torch.tensor(2.0))  # the list its stream cycles
    with pytest.raises(ValueError, match="splitting a batch into 2 shards .* needs tensors with a batch dimension"):
        case.engine.run()


@pytest.mark.parametrize("memory", ["remat", "mixed"])
def test_lean_unrolled_windows_replay_the_same_micro_batches(memory):
    """A rematerialized step runs its loss again in the backward pass: the same shards, the same value."""
    whole, _ = hypergradient("unroll")
    got, _ = hypergradient("unroll", unroll_memory=memory, accumulate_steps=3)
    assert float((got - whole).abs() / whole.abs()) < 1e-13
