"""The differentiable optimizer steps reproduce torch.optim exactly and honour the user's instance."""

import pytest
import torch
from torch import nn

from betty_like.optim import FunctionalOptimizer, supported_optimizers

CASES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum_dampening": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01
    ),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
    "sgd_maximize": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, maximize=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), weight_decay=0.01),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def _loss(model: nn.Module, params=None) -> torch.Tensor:
    x = torch.linspace(-1, 1, 20, dtype=torch.float64).reshape(5, 4)
    out = model(x) if params is None else torch.func.functional_call(model, params, (x,))
    return (out**2).mean() + out.sum()


@pytest.mark.parametrize("case", CASES)
def test_functional_steps_equal_torch_steps(case):
    reference, functional_model = _model(), _model()
    ref_opt = CASES[case](reference.parameters())
    opt = CASES[case](functional_model.parameters())
    names = {id(p): n for n, p in functional_model.named_parameters()}
    functional = FunctionalOptimizer.from_optimizer(opt, names, "model")
    params = {n: p.detach().clone() for n, p in functional_model.named_parameters()}
    state = functional.state
    for _ in range(6):
        ref_opt.zero_grad()
        _loss(reference).backward()
        ref_opt.step()
        leaves = {n: p.requires_grad_(True) for n, p in params.items()}
        grads = dict(
            zip(
                leaves,
                torch.autograd.grad(_loss(functional_model, leaves), list(leaves.values())),
                strict=True,
            )
        )
        params, state = functional.step({n: p.detach() for n, p in leaves.items()}, grads, state)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), rtol=1e-13, atol=1e-15)
    # writing the state back makes the user's optimizer continue exactly where the unrolled steps ended
    with torch.no_grad():
        for name, p in functional_model.named_parameters():
            p.copy_(params[name])
    functional.write_back(state)
    for model, optimizer in ((reference, ref_opt), (functional_model, opt)):
        optimizer.zero_grad()
        _loss(model).backward()
        optimizer.step()
    for (_, a), (_, b) in zip(reference.named_parameters(), functional_model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_per_group_hyperparameters_are_honoured():
    model = _model()
    first, second = list(model.children())[0], list(model.children())[2]
    opt = torch.optim.SGD(
        [{"params": first.parameters(), "lr": 0.5}, {"params": second.parameters()}], lr=0.01
    )
    functional = FunctionalOptimizer.from_optimizer(opt, {id(p): n for n, p in model.named_parameters()}, "m")
    hps = functional.hyperparameters()
    assert hps["0.weight"]["lr"] == 0.5 and hps["2.weight"]["lr"] == 0.01


def test_steps_are_differentiable_through_hyperparameter_tensors():
    model = _model()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["lr"] = lr
    functional = FunctionalOptimizer.from_optimizer(opt, {id(p): n for n, p in model.named_parameters()}, "m")
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    grads = dict(zip(params, torch.autograd.grad(_loss(model, params), list(params.values())), strict=True))
    stepped, _ = functional.step(params, grads)
    (d_lr,) = torch.autograd.grad(_loss(model, stepped), lr)
    # chain rule: d/dlr L(w - lr g) = -<grad L(w - lr g), g>
    after = {k: v.detach().requires_grad_(True) for k, v in stepped.items()}
    grads_after = torch.autograd.grad(_loss(model, after), list(after.values()))
    expected = -sum((a * grads[k]).sum() for k, a in zip(after, grads_after, strict=True))
    torch.testing.assert_close(d_lr, expected, rtol=1e-12, atol=1e-14)


def test_unsupported_optimizer_is_named_with_the_supported_list():
    model = _model()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"problem 'net'.*RMSprop.*\['SGD', 'Adam', 'AdamW'\]"):
        FunctionalOptimizer.from_optimizer(opt, {id(p): n for n, p in model.named_parameters()}, "net")
    assert supported_optimizers() == ["SGD", "Adam", "AdamW"]


def test_adam_double_backward_is_finite_where_the_second_moment_is_zero():
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(3, dtype=torch.float64))], lr=0.1)
    functional = FunctionalOptimizer.from_optimizer(opt, {id(opt.param_groups[0]["params"][0]): "p"}, "m")
    g = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64, requires_grad=True)
    new, _ = functional.step({"p": p}, {"p": g * p.sum() + g})
    (second,) = torch.autograd.grad(new["p"].sum(), g, create_graph=True)
    assert torch.isfinite(second).all()
