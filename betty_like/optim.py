"""Differentiable (functional) versions of ``torch.optim`` steps.

Unrolled hypergradients and the fixed-point method differentiate *through* an optimizer step, which
``torch.optim`` cannot do: it updates leaves in place. Here each supported optimizer class has a
pure step ``(params, grads, state, hp) -> (params, state)`` over dicts keyed by parameter name,
whose arithmetic follows the torch implementation exactly. Class, hyperparameters (per parameter
group) and state are read from the user's own optimizer instance and written back to it, so the
user's optimizer stays the single source of truth; nothing is ever rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

Params = dict[str, Tensor]
State = dict[str, dict[str, Tensor]]
StepFn = Callable[[Tensor, Tensor, dict[str, Tensor], Mapping[str, object]], tuple[Tensor, dict[str, Tensor]]]


def _sgd_step(p: Tensor, g: Tensor, state: dict[str, Tensor], hp: Mapping[str, object]):
    if hp["maximize"]:
        g = -g
    if hp["weight_decay"]:
        g = g + hp["weight_decay"] * p
    new_state = dict(state)
    momentum = hp["momentum"]
    if momentum:
        buf = state.get("momentum_buffer")
        buf = g if buf is None else momentum * buf + (1 - hp["dampening"]) * g
        new_state["momentum_buffer"] = buf
        g = g + momentum * buf if hp["nesterov"] else buf
    return p - hp["lr"] * g, new_state


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt whose derivative at 0 is 0 instead of inf, so double backward never produces NaN."""
    positive = x > 0
    return torch.where(
        positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x)
    )


def _adam_step(p: Tensor, g: Tensor, state: dict[str, Tensor], hp: Mapping[str, object]):
    if hp["maximize"]:
        g = -g
    beta1, beta2 = hp["betas"]
    lr, wd = hp["lr"], hp["weight_decay"]
    if wd and hp["decoupled_weight_decay"]:
        p = p * (1 - lr * wd)
    elif wd:
        g = g + wd * p
    step = state.get("step", torch.zeros((), dtype=torch.float32)) + 1
    exp_avg = state.get("exp_avg", torch.zeros_like(p))
    exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(p))
    exp_avg = exp_avg + (1 - beta1) * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    bias1, bias2_sqrt = _bias_corrections(step, beta1, beta2)
    new_state = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    second = exp_avg_sq
    if hp["amsgrad"]:
        second = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(p)), exp_avg_sq)
        new_state["max_exp_avg_sq"] = second
    denom = _safe_sqrt(second) / bias2_sqrt + hp["eps"]
    return p - (lr / bias1) * (exp_avg / denom), new_state


def _bias_corrections(step: Tensor, beta1: float, beta2: float) -> tuple[float | Tensor, float | Tensor]:
    """Adam's ``1 - beta1**t`` and ``sqrt(1 - beta2**t)`` at step count ``t``.

    Eagerly, torch computes them in Python floats, and doing the same keeps the steps bit-equal. A
    captured step (``torch.compile``) cannot read the count back to Python without breaking its graph,
    so there they are float64 tensor arithmetic, equal to the float path up to rounding.
    """
    if torch.compiler.is_compiling():
        count = step.to(torch.float64)
        return 1 - beta1**count, torch.sqrt(1 - beta2**count)
    count = float(step)
    return 1 - beta1**count, (1 - beta2**count) ** 0.5


def _adam_hyperparameters(group: Mapping[str, object], decoupled_default: bool) -> dict[str, object]:
    return {
        "lr": group["lr"],
        "betas": tuple(group["betas"]),
        "eps": group["eps"],
        "weight_decay": group["weight_decay"],
        "amsgrad": group.get("amsgrad", False),
        "maximize": group.get("maximize", False),
        "decoupled_weight_decay": group.get("decoupled_weight_decay", decoupled_default),
    }


def _sgd_hyperparameters(group: Mapping[str, object]) -> dict[str, object]:
    return {
        "lr": group["lr"],
        "momentum": group.get("momentum", 0.0),
        "dampening": group.get("dampening", 0.0),
        "nesterov": group.get("nesterov", False),
        "weight_decay": group.get("weight_decay", 0.0),
        "maximize": group.get("maximize", False),
    }


@dataclass(frozen=True)
class _Rule:
    step: StepFn
    hyperparameters: Callable[[Mapping[str, object]], dict[str, object]]


# Keyed by exact class: a subclass may change the update rule, so it must not silently inherit ours.
_RULES: dict[type, _Rule] = {
    torch.optim.SGD: _Rule(_sgd_step, _sgd_hyperparameters),
    torch.optim.Adam: _Rule(_adam_step, lambda g: _adam_hyperparameters(g, decoupled_default=False)),
    torch.optim.AdamW: _Rule(_adam_step, lambda g: _adam_hyperparameters(g, decoupled_default=True)),
}


def supported_optimizers() -> list[str]:
    """Names of the ``torch.optim`` classes that can be differentiated through."""
    return [cls.__name__ for cls in _RULES]


def has_pure_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s class has a pure step here (exact class: subclasses may change the rule)."""
    return type(optimizer) in _RULES


def _rule_for(optimizer: torch.optim.Optimizer, owner: str) -> _Rule:
    rule = _RULES.get(type(optimizer))
    if rule is None:
        raise TypeError(
            f"problem {owner!r}: cannot differentiate through {type(optimizer).__name__}; "
            f"supported optimizers are {supported_optimizers()}. Use one of them, or a hypergradient "
            "method that does not step through the optimizer (neumann, cg, darts)."
        )
    return rule


@dataclass
class FunctionalOptimizer:
    """A pure view of a user's ``torch.optim`` optimizer over named parameters.

    ``hyperparameters`` and ``state`` are snapshots keyed by parameter name; ``step`` never mutates
    them, so it can run inside an autograd graph. ``write_back`` stores a state into the user's
    optimizer (detached), which is how the real optimizer learns what the unrolled steps did.
    """

    optimizer: torch.optim.Optimizer
    names: dict[int, str]
    owner: str
    state: State = field(default_factory=dict)

    @classmethod
    def from_optimizer(
        cls,
        optimizer: torch.optim.Optimizer,
        names: Mapping[int, str],
        owner: str,
        differentiable: bool = True,
    ) -> FunctionalOptimizer:
        """Wrap ``optimizer``; ``names`` maps each parameter's ``id`` to its name.

        With ``differentiable=True`` an optimizer class without a pure step raises ``TypeError``
        now; otherwise only :meth:`step` and :meth:`hyperparameters` raise, and the learning rate
        and state stay readable (all that darts, neumann and cg need).
        """
        if differentiable:
            _rule_for(optimizer, owner)
        functional = cls(optimizer, dict(names), owner)
        functional.reload_state()
        return functional

    def reload_state(self) -> None:
        """Re-read the optimizer's state (after a real ``optimizer.step()`` changed it)."""
        self.state = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                saved = self.optimizer.state.get(p)
                if saved:
                    self.state[self.names[id(p)]] = {k: v for k, v in saved.items() if torch.is_tensor(v)}

    @property
    def rule(self) -> _Rule:
        return _rule_for(self.optimizer, self.owner)

    def hyperparameters(self) -> dict[str, dict[str, object]]:
        """Per-parameter hyperparameters read from the live param groups (schedulers included)."""
        out: dict[str, dict[str, object]] = {}
        rule = self.rule
        for group in self.optimizer.param_groups:
            hp = rule.hyperparameters(group)
            for p in group["params"]:
                out[self.names[id(p)]] = hp
        return out

    def learning_rate(self) -> float:
        """The first parameter group's learning rate, as a float."""
        return float(self.optimizer.param_groups[0]["lr"])

    def learning_rates(self) -> dict[str, float]:
        """Each parameter's own group learning rate, keyed by name (any optimizer class)."""
        return {self.names[id(p)]: float(g["lr"]) for g in self.optimizer.param_groups for p in g["params"]}

    def step(
        self,
        params: Params,
        grads: Params,
        state: State | None = None,
        hyperparameters: Mapping[str, Mapping[str, object]] | None = None,
    ) -> tuple[Params, State]:
        """One differentiable optimizer step; returns new params and new state, mutates nothing.

        ``hyperparameters`` (per parameter name, as :meth:`hyperparameters` returns them) default to
        the live param groups; a captured step passes its own, with the learning rate as a tensor, so
        that a scheduler changing it does not force a new graph.
        """
        state = self.state if state is None else state
        hps = self.hyperparameters() if hyperparameters is None else hyperparameters
        rule = self.rule
        new_params, new_state = {}, {}
        for name, p in params.items():
            g = grads.get(name)
            if g is None or name not in hps:
                new_params[name] = p
                if name in state:
                    new_state[name] = state[name]
                continue
            new_params[name], new_state[name] = rule.step(p, g, state.get(name, {}), hps[name])
        return new_params, new_state

    def write_back(self, state: State) -> None:
        """Store ``state`` (detached) into the user's optimizer, in torch's own format."""
        self.state = {n: {k: v.detach() for k, v in s.items()} for n, s in state.items()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name = self.names[id(p)]
                if name in self.state:
                    self.optimizer.state[p] = {k: v.clone() for k, v in self.state[name].items()}


def clip_grad_norm(grads: Params, max_norm: float) -> Params:
    """Differentiable global-norm clipping, the same rule as ``torch.nn.utils.clip_grad_norm_``."""
    total = torch.sqrt(sum(torch.sum(g * g) for g in grads.values()))
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {k: g * factor for k, g in grads.items()}
