"""``Problem``: one level of a multilevel program, written by the user.

A problem is deliberately thin: a name, a module, an optimizer (and optional scheduler), data, a
config and the loss (``training_step``). Everything that changes during training (batches,
counters, unrolled weights) lives in the :class:`~betty_like.engine.Engine`.
"""

from __future__ import annotations

import functools
import keyword
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import ProblemConfig

# Attributes of every problem, and of the nn.Module that holds all problems' modules by name.
_RESERVED = frozenset({"name", "module", "optimizer", "scheduler", "data", "config"}) | frozenset(
    dir(nn.Module)
)


class Problem(ABC):
    """One optimization problem (level) of a multilevel program.

    Subclass it and implement :meth:`training_step`. Other problems of the same engine are reached
    as attributes by their names: ``self.classifier(x)`` runs the ``classifier`` problem's module
    (with its current, possibly unrolled, parameters) and ``self.classifier.module`` is the module.

    Args:
        name: a Python identifier, unique within the engine.
        module: the ``nn.Module`` whose parameters this problem optimizes.
        optimizer: a ``torch.optim`` optimizer over (some of) ``module``'s parameters; only the
            parameters it holds are trained, and hypergradients are taken with respect to them.
        scheduler: an optional learning-rate scheduler, stepped after every step of this problem.
        data: any iterable of batches; it is cycled (re-iterated) when exhausted.
        config: how this problem steps and how gradients flow through it.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        data: Any | None = None,
        config: ProblemConfig | None = None,
    ) -> None:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"problem name {name!r} is not a Python identifier: use letters, digits and '_'")
        if name.startswith("_") or hasattr(type(self), name) or name in _RESERVED:
            raise ValueError(
                f"problem name {name!r} clashes with an attribute of {type(self).__name__}: choose another name"
            )
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"problem {name!r}: module must be an nn.Module, got {type(module).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"problem {name!r}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if config is not None and not isinstance(config, ProblemConfig):
            raise TypeError(f"problem {name!r}: config must be a ProblemConfig, got {type(config).__name__}")
        self.name = name
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        self.config = config if config is not None else ProblemConfig()
        self._engine: Any = None  # the Engine it belongs to, set by the engine (never imported here)
        self._names: list[str] | None = None  # names of its trainable parameters, for parameters()
        self.parameters()  # fixes the names now, before any call substitutes the module's tensors

    @abstractmethod
    def training_step(self, batch: Any) -> torch.Tensor:
        """Return this problem's scalar loss on ``batch``."""

    def output_loss(self, batch: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Optional: this problem's loss split as ``(outputs, loss_fn)`` with ``loss_fn(outputs) == training_step(batch)``.

        ``outputs`` is the model's output tensor (rows of per-example outputs, the last dimension
        the entries of a row, e.g. logits); ``loss_fn`` a loss of those outputs alone (per-example
        weights and labels closed over). Needed where *this* problem's solution is differentiated
        with ``curvature="gauss_newton"`` or ``hypergrad="kfac"``: Gauss-Newton products need the
        Hessian of ``loss_fn`` in the outputs, KFAC its square root per row. Example::

            def output_loss(self, batch):
                x, y = batch
                w = self.reweight(x, y)
                return self.module(x), lambda z: (w * F.cross_entropy(z, y, reduction="none")).mean()
        """
        raise NotImplementedError(
            f"problem {self.name!r} defines no output_loss(batch): return (outputs, loss_fn) with "
            "loss_fn(outputs) == training_step(batch)"
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """What calling the problem runs: its module (inside the engine: with its current parameters).

        Override it to call the module differently (Betty's ``Problem.forward``); ``self.other(x)``
        from another problem runs the override too.
        """
        if self.module is None:
            raise TypeError(f"problem {self.name!r} has no module to call: pass module=... when creating it")
        return self.module(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run :meth:`forward` (by default the module, with its current parameters inside the engine)."""
        return self.forward(*args, **kwargs)

    def parameters(self) -> list[torch.Tensor]:
        """The trainable parameters: those its optimizer holds, in its order.

        Inside the engine's calls of ``training_step`` these are the current values (unrolled or
        substituted weights), so a regularizer written with them is differentiated correctly.
        """
        if self.module is None or self.optimizer is None:
            return []
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        if self._names is None:  # fixed at the first call; under substitution the ids change, the names do not
            self._names = [n for n, p in self.module.named_parameters() if id(p) in held]
        return [functools.reduce(getattr, n.split("."), self.module) for n in self._names]

    def log(self, name: str, value: Any) -> None:
        """Record metric ``name`` for this step (call it from ``training_step``); loggers write it every ``log_every``."""
        engine = self.__dict__.get("_engine")
        if engine is None:
            raise RuntimeError(f"problem {self.name!r}: self.log works inside an Engine's run, which it is not part of")
        engine.metrics.log(self.name, name, value)

    def __getattr__(self, item: str) -> Problem:
        # Only reached when normal lookup fails: resolve another problem of the same engine by name.
        engine = self.__dict__.get("_engine")
        if engine is not None and item in engine.problems:
            return engine.problems[item]
        known = sorted(engine.problems) if engine is not None else []
        hint = (
            f"problems in this engine: {known}" if engine is not None else "it is not part of an Engine yet"
        )
        raise AttributeError(f"problem {self.__dict__.get('name', '?')!r} has no attribute {item!r} ({hint})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
