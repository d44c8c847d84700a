"""Second order through fused attention: hypergradient passes switch to the math SDPA kernel themselves.

On CPU, ``scaled_dot_product_attention`` runs the flash kernel, which has no double backward; the
engine's plain steps keep it, every pass that is differentiated twice or kept for later runs math.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.hypergrad import total_derivative


class TinyAttention(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, x):  # x: (batch, tokens, dim)
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return self.out(F.scaled_dot_product_attention(q, k, v).squeeze(1).mean(1)).squeeze(-1)


class Lower(Problem):
    def training_step(self, batch):
        x, y = batch
        return (self.upper.module.scale * (self.module(x) - y) ** 2).mean() + 1e-2 * sum(
            (p**2).sum() for p in self.module.parameters()
        )


class Upper(Problem):
    def training_step(self, batch):
        x, y = batch
        return ((self.lower(x) - y) ** 2).mean()


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))


def hypergradient(method: str, forced_math: bool) -> torch.Tensor:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 5, 8, generator=g), torch.randn(16, generator=g)) for _ in range(2)]
    net, scale = TinyAttention(), Scale()
    lower = Lower(
        "lower", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), data=data,
        config=ProblemConfig(hypergrad=method, iterations=5, damping=1.0, unroll_steps=2),
    )
    upper = Upper("upper", module=scale, optimizer=torch.optim.SGD(scale.parameters(), lr=0.0), data=data[:1])
    engine = Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, EngineConfig(train_iters=2))
    if forced_math:
        with sdpa_kernel([SDPBackend.MATH]):
            engine.run()
    else:
        engine.run()
    return engine.status("upper").gradient["upper.scale"]


def test_the_fused_kernel_has_no_double_backward_here():
    q, k, v = (torch.randn(2, 1, 5, 8, requires_grad=True) for _ in range(3))
    (g,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g.sum(), k)


@pytest.mark.parametrize("method", ["cg", "unroll", "neumann"])
def test_hypergradients_through_attention_equal_those_with_the_math_kernel_forced(method):
    automatic = hypergradient(method, forced_math=False)
    forced = hypergradient(method, forced_math=True)
    assert torch.isfinite(automatic) and automatic.abs() > 0
    torch.testing.assert_close(automatic, forced, rtol=1e-4, atol=1e-7)


def test_the_math_kernel_switch_is_said_once(caplog, monkeypatch):
    monkeypatch.setattr(total_derivative, "_said", set())  # what this process has said already
    with caplog.at_level(logging.INFO, logger="betty_like"):
        hypergradient("cg", forced_math=False)  # two upper steps, each a hypergradient
    said = [r for r in caplog.records if "scaled_dot_product_attention with its math kernel" in r.message]
    assert len(said) == 1
