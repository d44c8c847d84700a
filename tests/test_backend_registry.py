"""The generic registry with an op of its own, and configs that name policies without importing a backend."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toy import bilevel

from betty_like import ProblemConfig
from betty_like.backends import registry

OP = "test_linear"


class AlgorithmLinear(nn.Linear):
    """A ``nn.Linear`` that runs the algorithm its selector picks, holding the replaced layer's parameters."""

    def __init__(self, layer: nn.Linear, selector: registry.Selector, label: str) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight, self.bias = layer.weight, layer.bias
        self.selector, self.label = selector, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return registry.algorithm(OP, self.selector.choose(self, x)).impl(self, x, self.weight, self.bias)


class FirstCandidate:
    """A tuner that picks the first candidate it is offered (enough to exercise ``"auto"``)."""

    def choose(self, layer, x, candidates):
        return candidates[0], f"first of {candidates}"


@pytest.fixture(scope="module")
def linear_op():
    if OP not in registry.known_ops():
        registry.define_op(OP, nn.Linear, AlgorithmLinear, AlgorithmLinear, FirstCandidate)
        registry.register(OP, "torch", lambda layer, x, w, b: F.linear(x, w, b), tunable=False)
        registry.register(OP, "matmul", lambda layer, x, w, b: x @ w.T + b)
        registry.register(
            OP, "square", lambda layer, x, w, b: x @ w.T + b,
            supports=lambda layer: None if layer.in_features == layer.out_features else "square layers only",
        )
    return OP


def test_a_second_op_registers_and_swaps_in_place(linear_op):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2), nn.Conv2d(1, 1, 1))
    x = torch.randn(5, 4)
    reference = model[2](model[1](model[0](x)))
    params = [id(p) for p in model.parameters()]
    assert registry.available(linear_op) == ["torch", "matmul", "square"]
    assert registry.available(linear_op, model[2]) == ["torch", "matmul"]
    registry.swap(model, "matmul", op=linear_op)
    assert isinstance(model[0], AlgorithmLinear) and type(model[3]) is nn.Conv2d  # other ops untouched
    assert [id(p) for p in model.parameters()] == params
    torch.testing.assert_close(model[2](model[1](model[0](x))), reference)
    registry.swap(model, ["square", "torch"], op=linear_op)  # re-swap by layer order
    torch.testing.assert_close(model[2](model[1](model[0](x))), reference)
    registry.swap(model, "auto", op=linear_op)  # the op's default tuner, only tunable candidates
    model[2](model[1](model[0](x)))
    rows = registry.choices(model)
    assert [(r["layer"], r["algorithm"]) for r in rows] == [("0", "matmul"), ("2", "matmul")]
    assert rows[0]["input"] == "[5, 4] float32 cpu" and rows[0]["why"] == "first of ['matmul', 'square']"


def test_a_second_op_rejects_names_that_do_not_apply(linear_op):
    with pytest.raises(ValueError, match=r"layer '1' .*'square', which does not apply to it \(square layers only\)"):
        registry.swap(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3)), "square", op=linear_op)
    with pytest.raises(ValueError, match=r"unknown test_linear algorithm 'fast'.*\['torch', 'matmul', 'square', 'auto'\]"):
        registry.swap(nn.Sequential(nn.Linear(2, 2)), "fast", op=linear_op)


def test_a_config_naming_conv_policies_imports_no_backend_and_probes_no_ai3():
    script = textwrap.dedent(
        """
        import sys

        probed = []

        class Recorder:
            def find_spec(self, name, path=None, target=None):
                probed.append(name)
                return None

        sys.meta_path.insert(0, Recorder())
        import betty_like

        config = betty_like.ProblemConfig(backends={"conv2d": "auto"})
        betty_like.ProblemConfig(backends={"conv2d": ["im2col", "winograd"]})
        loaded = sorted(m for m in sys.modules if m.startswith("betty_like.backends"))
        assert loaded == ["betty_like.backends", "betty_like.backends.registry"], loaded
        assert not [n for n in probed if n.split(".")[0] in ("ai3", "aithree")], probed
        assert config.backends == {"conv2d": "auto"}
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_wrong_op_or_policy_form_fails_at_construction_with_the_choices():
    with pytest.raises(ValueError, match=r"backends\['conv3d'\]='auto' is invalid: unknown op 'conv3d': choose one of \[.*'conv2d'.*\]"):
        ProblemConfig(backends={"conv3d": "auto"})
    with pytest.raises(ValueError, match=r"backends\['conv2d'\]=3 is invalid: a conv2d policy is a name, a list of names"):
        ProblemConfig(backends={"conv2d": 3})
    with pytest.raises(ValueError, match=r"ProblemConfig.backends='auto' is invalid: use a dict op -> policy"):
        ProblemConfig(backends="auto")


def test_a_wrong_algorithm_name_fails_before_the_first_step_naming_problem_op_and_choices():
    with pytest.raises(
        ValueError,
        match=r"problem 'inner': ProblemConfig.backends\['conv2d'\]='im2cl' is invalid: unknown conv2d algorithm "
        r"'im2cl' .*choose from \[.*'im2col'.*'auto'\]",
    ):
        bilevel(ProblemConfig(backends={"conv2d": "im2cl"}))
