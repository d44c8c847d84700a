"""A nested three-level program (each level reads the one below) with implicit methods at every level.

Here the middle problem's own loss reads the lowest solution. Its hypergradient from the lowest
level is exact (a bilevel push). With ``nested="partial"`` on the middle problem, its best response
is differentiated for the top level with the lowest solution held fixed in the middle Hessian
(Betty's rule), checked here against that rule's closed form; the exact total rule is checked in
``test_nested_exact.py``.
"""

from dataclasses import replace

import pytest
import torch

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.testing.closed_form import DTYPE, Scalar, linear, regression_data

RHO = 0.7


class Low(Problem):
    def training_step(self, batch):
        x, y = batch
        pull = self.module.weight - self.mid.module.weight
        return 0.5 * ((self.module(x).squeeze(-1) - y) ** 2).mean() + 0.5 * RHO * (pull**2).sum()


class Mid(Problem):
    def training_step(self, batch):
        x, y = batch
        w = self.module.weight
        fit = 0.5 * ((self.low(x).squeeze(-1) - y) ** 2).mean()
        return fit + 0.5 * torch.exp(self.top()) * (w**2).sum() + 0.5 * ((w - 1.0) ** 2).sum()


class Top(Problem):
    def training_step(self, batch):
        x, y = batch
        return 0.5 * ((self.mid(x).squeeze(-1) - y) ** 2).mean()


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_nested_three_levels(method):
    d = 3
    xa, ya = regression_data(20, d, seed=7)
    xc, yc = regression_data(20, d, seed=8)
    xd, yd = regression_data(20, d, seed=9)
    lam = torch.tensor(0.3, dtype=DTYPE)
    w_mid = torch.tensor([0.2, -0.4, 0.6], dtype=DTYPE)
    h_low = xa.T @ xa / 20 + RHO * torch.eye(d, dtype=DTYPE)
    w_low = torch.linalg.solve(h_low, xa.T @ ya / 20 + RHO * w_mid)
    low_m, mid_m, top_m = linear(d, w_low), linear(d, w_mid), Scalar(lam)
    cfg = ProblemConfig(hypergrad=method, iterations=500, alpha=0.2)  # lr is 0 so that nothing moves
    low = Low(
        "low",
        module=low_m,
        optimizer=torch.optim.SGD(low_m.parameters(), lr=0.0),
        data=[(xa, ya)],
        config=cfg,
    )
    mid = Mid(
        "mid",
        module=mid_m,
        optimizer=torch.optim.SGD(mid_m.parameters(), lr=0.0),
        data=[(xc, yc)],
        config=replace(cfg, nested="partial"),
    )
    top = Top("top", module=top_m, optimizer=torch.optim.SGD(top_m.parameters(), lr=0.0), data=[(xd, yd)])
    engine = Engine(
        [top, mid, low],
        {"u2l": {top: [mid], mid: [low]}, "l2u": {low: [mid], mid: [top]}},
        EngineConfig(train_iters=1),
    )
    engine.run()
    assert engine.status("mid").steps == 1 and engine.status("top").steps == 1

    # middle level: exact bilevel hypergradient through the lowest solution
    jacobian = RHO * torch.linalg.inv(h_low)  # dw_low*/dw_mid (symmetric)
    direct = torch.exp(lam) * w_mid + (w_mid - 1.0)
    through_low = jacobian @ (xc.T @ (xc @ w_low - yc) / 20)
    expected_mid = direct + through_low
    got_mid = engine.status("mid").gradient["mid.weight"].reshape(-1)
    torch.testing.assert_close(got_mid, expected_mid, rtol=1e-6, atol=1e-10)

    # top level: middle Hessian taken with the lowest solution fixed = (exp(lam) + 1) I
    grad_top_w = xd.T @ (xd @ w_mid - yd) / 20
    expected_top = -torch.exp(lam) * (w_mid @ grad_top_w) / (torch.exp(lam) + 1.0)
    got_top = engine.status("top").gradient["top.value"]
    torch.testing.assert_close(got_top, expected_top, rtol=1e-6, atol=1e-10)


def test_fixed_point_refuses_a_zero_learning_rate():
    from betty_like.testing import ridge

    case = ridge("fixed_point", lr=0.0)
    with pytest.raises(ValueError, match="problem 'inner'.*identity at learning rate 0"):
        case.engine.run()


def test_neumann_default_alpha_does_not_depend_on_the_learning_rate():
    # alpha=None estimates the curvature by power iteration: a zero learning rate is no obstacle
    from betty_like.testing import ridge

    case = ridge("neumann", lr=0.0)
    case.engine.run()
    info = case.engine.status(case.upper).diagnostics[case.lower].solve
    assert info.outcome == "converged" and info.alpha > 0
    torch.testing.assert_close(case.engine.status(case.upper).gradient["penalty.value"], case.exact, rtol=1e-8, atol=0)
