"""Operator backends: a registry of algorithms per operator and ``swap``, which installs them.

An *op* (``"conv2d"``) names one kind of layer (``nn.Conv2d``) that several algorithms can compute.
Each algorithm is registered under a name with the rule that says which layers it applies to, so
``available(op, layer)`` only offers what can run there. ``swap(module, policy)`` replaces the op's
layers of any ``nn.Module`` in place by a wrapper that holds the *same* parameter objects under the
same names, so the model's ``state_dict`` keys, optimizers built before the swap and checkpoints all
keep working, and residual or branching models need no tracing.

A policy picks an algorithm per layer, in the forms ai3 introduced plus timing:

- a name: the same algorithm for every layer;
- a list of names, one per layer, in the order ``module.modules()`` meets them;
- a callable ``f(layer, input_shape) -> name``, asked once per distinct input shape;
- ``"auto"``: the op's tuner times the candidates on the first real input of each shape.

The built-in ops register themselves when first used (``conv2d`` in :mod:`betty_like.backends.conv`);
this module imports none of them, so configs can check an op's name and a policy's form for free
(:func:`check_config_policy`). What an op needs of its inputs (the key a per-input choice is
remembered under) is the op's own business: ``define_op(..., input_key=...)``.

The contract every backend follows is written in ``docs/backends/index.md``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Supports = Callable[[nn.Module], str | None]
"""``supports(layer)`` returns None when an algorithm applies to ``layer``, else the reason it does not."""

Policy = str | Sequence[str] | Callable[[nn.Module, tuple[int, ...]], str]

InputKey = Callable[[Tensor], tuple[Hashable, str]]
"""``input_key(x) -> (key, shown)``: what a per-input choice depends on, and how to show it in tables."""

AUTO = "auto"
_BUILTIN_OPS = {"conv2d": "betty_like.backends.conv"}


@dataclass(frozen=True)
class Algorithm:
    """One registered way to compute an op.

    Attributes:
        name: the name policies use.
        impl: ``impl(layer, x, weight, bias) -> output``; weight and bias are passed explicitly so the
            tuner can time on detached copies and ``functional_call`` substitutions are honoured.
        supports: which layers it applies to (see :data:`Supports`).
        tunable: whether ``"auto"`` may pick it (reference implementations are kept out).
    """

    name: str
    impl: Callable[..., Tensor]
    supports: Supports
    tunable: bool = True


class Selector(Protocol):
    """Picks an algorithm name for one layer and one input; ``choices()`` lists what it picked."""

    def choose(self, layer: nn.Module, x: Tensor) -> str:
        """The algorithm name for ``layer`` on input ``x``."""
        ...

    def choices(self) -> list[tuple[str, str, str]]:
        """``(input, algorithm, why)`` for every decision so far."""
        ...


@runtime_checkable
class FirstOrderOnly(Protocol):
    """A layer that declares whether it supports double backward (the backend contract's capability).

    A backend layer whose backward is not itself differentiable sets ``first_order_only`` to True
    (it may depend on the layer's configuration). The engine reads it through this Protocol, together
    with the hypergradient method's own ``second_order`` flag, and refuses a method that needs second
    derivatives before the first step. Layers that do not carry the attribute are taken to support
    double backward, as every torch op a hypergradient passes through must.
    """

    @property
    def first_order_only(self) -> bool:
        """Whether this layer's backward has no usable derivative of its own."""
        ...


def first_order_only_layers(module: nn.Module) -> list[str]:
    """Sorted type names of the layers in ``module`` that declare first-order-only gradients."""
    return sorted({type(m).__name__ for m in module.modules() if isinstance(m, FirstOrderOnly) and m.first_order_only})


class Tuner(Protocol):
    """Times candidates for an op and remembers the choice (``"auto"``)."""

    def choose(self, layer: nn.Module, x: Tensor, candidates: list[str]) -> tuple[str, str]:
        """The fastest of ``candidates`` for ``layer`` on inputs like ``x``, and a note with the timings."""
        ...


@dataclass
class _Op:
    layer_type: type[nn.Module]
    wrapper_type: type[nn.Module]
    wrap: Callable[[nn.Module, Selector, str], nn.Module]
    default_tuner: Callable[[], Tuner]
    input_key: InputKey
    algorithms: dict[str, Algorithm] = field(default_factory=dict)


_OPS: dict[str, _Op] = {}


def define_op(
    op: str,
    layer_type: type[nn.Module],
    wrapper_type: type[nn.Module],
    wrap: Callable[[nn.Module, Selector, str], nn.Module],
    default_tuner: Callable[[], Tuner],
    *,
    input_key: InputKey | None = None,
) -> None:
    """Declare an op: the layer type it replaces, the wrapper built by ``wrap(layer, selector, label)``
    (a subclass of ``layer_type`` that ``swap`` may re-swap), the tuner ``"auto"`` uses by default and
    the key per-input choices are remembered under (default: shape, dtype, device and grad mode)."""
    if op in _OPS:
        raise ValueError(f"op {op!r} is already defined")
    _OPS[op] = _Op(layer_type, wrapper_type, wrap, default_tuner, input_key or default_input_key)


def default_input_key(x: Tensor) -> tuple[Hashable, str]:
    """Shape, dtype, device and whether gradients are wanted: what most ops' speed depends on."""
    key = (tuple(x.shape), x.dtype, x.device, torch.is_grad_enabled())
    return key, f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')} {x.device}"


def known_ops() -> list[str]:
    """The ops defined so far and the built-in ones, without importing any backend."""
    return sorted(set(_OPS) | set(_BUILTIN_OPS))


def _op(op: str) -> _Op:
    if op not in _OPS and op in _BUILTIN_OPS:
        importlib.import_module(_BUILTIN_OPS[op])
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}: the registry knows {sorted(set(_OPS) | set(_BUILTIN_OPS))}")
    return _OPS[op]


def register(
    op: str,
    name: str,
    impl: Callable[..., Tensor],
    *,
    supports: Supports | None = None,
    tunable: bool = True,
    replace: bool = False,
) -> None:
    """Register ``impl(layer, x, weight, bias)`` as algorithm ``name`` of ``op``.

    ``supports`` restricts the layers it is offered for (default: all). A name registered twice is an
    error unless ``replace=True``, so two plug-ins cannot silently shadow each other.
    """
    spec = _op(op)
    if name == AUTO:
        raise ValueError(f"{AUTO!r} is the policy that times the algorithms; register under another name")
    if name in spec.algorithms and not replace:
        raise ValueError(f"{op} algorithm {name!r} is already registered; pass replace=True to override it")
    spec.algorithms[name] = Algorithm(name, impl, supports or (lambda layer: None), tunable)


def algorithm(op: str, name: str) -> Algorithm:
    """The registered algorithm ``name`` of ``op``."""
    spec = _op(op)
    if name not in spec.algorithms:
        raise ValueError(f"unknown {op} algorithm {name!r}: choose one of {list(spec.algorithms)} or {AUTO!r}")
    return spec.algorithms[name]


def available(op: str, layer: nn.Module | None = None, *, tunable_only: bool = False) -> list[str]:
    """Names of ``op``'s algorithms, in registration order; with ``layer``, only those that apply to it."""
    algos = _op(op).algorithms.values()
    return [
        a.name
        for a in algos
        if (layer is None or a.supports(layer) is None) and (a.tunable or not tunable_only)
    ]


def check_config_policy(op: Any, policy: Any) -> None:
    """Check an op's name and a policy's form without importing any backend (used by configs).

    Algorithm names are checked against the op's registry when the engine swaps the problem's
    module, before the first step; here only what needs no backend is checked.
    """
    if op not in known_ops():
        raise ValueError(f"unknown op {op!r}: choose one of {known_ops()}")
    _check_form(op, policy)


def _check_form(op: str, policy: Any) -> list[str]:
    """The names a policy mentions (empty for a callable); TypeError when its form is wrong."""
    if isinstance(policy, str):
        return [policy]
    if isinstance(policy, (list, tuple)) and all(isinstance(entry, str) for entry in policy):
        return list(policy)
    if callable(policy):
        return []
    raise TypeError(
        f"a {op} policy is a name, a list of names, a callable f(layer, input_shape) or {AUTO!r}; "
        f"got {policy!r}"
    )


def check_policy(op: str, policy: Any) -> None:
    """Reject a policy whose form or names are wrong before any module is seen (used by configs)."""
    names = [*_op(op).algorithms, AUTO]
    for entry in _check_form(op, policy):
        if entry not in names:
            raise ValueError(f"unknown {op} algorithm {entry!r} in policy {policy!r}: choose from {names}")


# ---------------------------------------------------------------------------------------- selectors
def _validated(op: str, layer: nn.Module, label: str, name: Any, origin: str) -> str:
    """``name`` if it is an algorithm of ``op`` that applies to ``layer``; otherwise a ValueError saying why."""
    offered = available(op, layer)
    if not isinstance(name, str) or name not in _op(op).algorithms:
        raise ValueError(
            f"layer {label!r} ({layer.extra_repr()}): {origin} gave {name!r}, which is not a {op} algorithm; "
            f"algorithms for this layer: {offered} or {AUTO!r}"
        )
    reason = _op(op).algorithms[name].supports(layer)
    if reason is not None:
        raise ValueError(
            f"layer {label!r} ({layer.extra_repr()}): {origin} gave {name!r}, which does not apply to it "
            f"({reason}); algorithms for this layer: {offered} or {AUTO!r}"
        )
    return name


class Fixed:
    """Always the same algorithm (checked against the layer when the policy is applied)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def choose(self, layer: nn.Module, x: Tensor) -> str:
        """The policy's name, whatever the input."""
        return self.name

    def choices(self) -> list[tuple[str, str, str]]:
        """One row: every input gets the policy's name."""
        return [("any", self.name, "fixed by the policy")]


class _PerInput(ABC):
    """Base of the selectors that decide once per input key and remember the decision."""

    op: str
    label: str

    def __init__(self) -> None:
        self.memo: dict[Hashable, tuple[str, str, str]] = {}

    def choose(self, layer: nn.Module, x: Tensor) -> str:
        """The remembered decision for inputs like ``x``, deciding on the first one."""
        key, shown = _op(self.op).input_key(x)
        if key not in self.memo:
            self.memo[key] = (shown, *self.decide(layer, x))
        return self.memo[key][1]

    @abstractmethod
    def decide(self, layer: nn.Module, x: Tensor) -> tuple[str, str]:
        """The algorithm for ``layer`` on inputs like ``x``, and a note saying why."""

    def choices(self) -> list[tuple[str, str, str]]:
        """``(input, algorithm, why)`` per input key seen so far."""
        return list(self.memo.values())


class ByShape(_PerInput):
    """A user callable ``f(layer, input_shape) -> name``, asked once per input shape, its answer checked."""

    def __init__(self, op: str, label: str, fn: Callable[[nn.Module, tuple[int, ...]], str]) -> None:
        super().__init__()
        self.op, self.label, self.fn = op, label, fn

    def decide(self, layer: nn.Module, x: Tensor) -> tuple[str, str]:
        """Ask the callable once for this input shape and check its answer against the layer."""
        origin = f"the policy callable for input shape {tuple(x.shape)}"
        return _validated(self.op, layer, self.label, self.fn(layer, tuple(x.shape)), origin), "policy callable"


class Auto(_PerInput):
    """Times the tunable candidates for the layer on the first input of each key (see the op's tuner)."""

    def __init__(self, op: str, label: str, tuner: Tuner) -> None:
        super().__init__()
        self.op, self.label, self.tuner = op, label, tuner

    def decide(self, layer: nn.Module, x: Tensor) -> tuple[str, str]:
        """Let the tuner time the layer's tunable algorithms on ``x``."""
        return self.tuner.choose(layer, x, available(self.op, layer, tunable_only=True))


# ---------------------------------------------------------------------------------------- swap
def swap(module: nn.Module, policy: Policy, *, op: str, tuner: Tuner | None = None, prefix: str = "") -> nn.Module:
    """Replace every ``op`` layer of ``module`` in place by one running the algorithm ``policy`` picks.

    Parameters keep their identity and names, so optimizers and ``state_dict``/``load_state_dict``
    work unchanged across the swap. Swapping a swapped model again changes the policy. ``tuner``
    overrides the op's default tuner for ``"auto"`` (e.g. a different cache file); ``prefix`` is
    prepended to layer names in messages (the engine passes the problem's name). Returns ``module``.

    Raises:
        ValueError: an unknown name, a name that does not apply to a layer, or a list whose length
            is not the number of layers; the message names the layer, the value and the choices.
        TypeError: a subclass of the layer type that the swap would change, or ``module`` itself a layer.
    """
    spec = _op(op)
    check_policy(op, policy)
    if isinstance(module, spec.layer_type):
        raise TypeError(f"swap replaces layers inside a module; wrap the {type(module).__name__} in nn.Sequential")
    layers: dict[int, tuple[str, nn.Module]] = {}
    paths: list[tuple[str, int]] = []
    for path, child in module.named_modules(remove_duplicate=False):
        if not isinstance(child, spec.layer_type):
            continue
        if type(child) not in (spec.layer_type, spec.wrapper_type):
            raise TypeError(
                f"layer {prefix + path!r} is a {type(child).__name__}, a subclass of {spec.layer_type.__name__} "
                f"with its own behaviour; swap only replaces plain {spec.layer_type.__name__} layers"
            )
        layers.setdefault(id(child), (prefix + path, child))
        paths.append((path, id(child)))
    ordered = list(layers.values())
    if isinstance(policy, (list, tuple)) and len(policy) != len(ordered):
        raise ValueError(
            f"the {op} policy list has {len(policy)} entries but the module has {len(ordered)} "
            f"{spec.layer_type.__name__} layers {[label for label, _ in ordered]}; give one name per layer, in that order"
        )
    replaced: dict[int, nn.Module] = {}
    for index, (ident, (label, layer)) in enumerate(layers.items()):
        entry = policy[index] if isinstance(policy, (list, tuple)) else policy
        replaced[ident] = spec.wrap(layer, _selector(op, layer, label, entry, tuner), label)
    for path, ident in paths:
        parent_path, _, attr = path.rpartition(".")
        module.get_submodule(parent_path).add_module(attr, replaced[ident])
    return module


def _selector(op: str, layer: nn.Module, label: str, entry: Any, tuner: Tuner | None) -> Selector:
    if callable(entry) and not isinstance(entry, str):
        return ByShape(op, label, entry)
    if entry == AUTO:
        return Auto(op, label, tuner if tuner is not None else _op(op).default_tuner())
    return Fixed(_validated(op, layer, label, entry, "the policy"))


def choices(module: nn.Module) -> list[dict[str, str]]:
    """Per swapped layer and input seen so far: the layer, its input, the algorithm and why it was picked."""
    rows = []
    for child in module.modules():
        selector = getattr(child, "selector", None)
        label = getattr(child, "label", None)
        if selector is None or label is None:
            continue
        for seen, name, note in selector.choices():
            rows.append({"layer": label, "config": child.extra_repr(), "input": seen, "algorithm": name, "why": note})
    return rows


def choice_table(module: nn.Module) -> str:
    """:func:`choices` as a Markdown table (what ``"auto"`` picked per layer, with its timings)."""
    lines = ["| layer | layer config | input | algorithm | why |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['config']} | {r['input']} | {r['algorithm']} | {r['why']} |" for r in choices(module)]
    return "\n".join(lines)
