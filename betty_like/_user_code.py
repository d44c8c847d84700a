"""The one place user code runs: every error it raises, or returns, names the problem."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._functional import ProblemModules, call_with


def _note(error: BaseException, message: str) -> None:
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(message)


def call_user(
    owner: str, what: str, modules: ProblemModules, params: Mapping[str, Tensor] | None, fn: Callable, *args: Any
) -> Any:
    """``fn(*args)`` with ``params`` substituted (``None``: the modules as they are); errors name ``owner`` and ``what``."""
    try:
        return fn(*args) if params is None else call_with(modules, params, fn, *args)
    except Exception as error:
        _note(error, f"(raised in problem {owner!r}'s {what})")
        raise


def checked_loss(owner: str, loss: Any, iteration: int) -> Tensor:
    """``loss`` as a 0-d tensor, or a ``TypeError`` / ``ValueError`` naming the problem and the fix."""
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"problem {owner!r}: training_step must return a scalar tensor, got {type(loss).__name__} "
            f"(iteration {iteration})"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"problem {owner!r}: training_step returned a tensor of shape {tuple(loss.shape)} at iteration "
            f"{iteration}; return a scalar, e.g. loss.mean()"
        )
    if not loss.is_floating_point():
        raise TypeError(
            f"problem {owner!r}: training_step returned a loss of dtype {loss.dtype} at iteration {iteration}; "
            "return a floating-point loss computed from the modules' outputs"
        )
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise ValueError(
            f"problem {owner!r}: training_step returned a loss that depends on no parameter (a constant, or "
            f"detached by .item(), .detach() or torch.no_grad()) at iteration {iteration}: compute it from "
            "self.module(...) or another problem's module, without detaching"
        )
    return loss if loss.dim() == 0 else loss.reshape(())


def validation_metrics(
    problems: Mapping[str, Any], modules: ProblemModules, params: Mapping[str, Tensor]
) -> dict[str, dict[str, float]]:
    """Every problem's optional ``validation_step()`` (no arguments, a dict of floats) at ``params``."""
    results = {}
    for name, problem in problems.items():
        step = getattr(problem, "validation_step", None)
        if step is None:
            continue
        with torch.no_grad():
            metrics = call_user(name, "validation_step", modules, params, step)
        if not isinstance(metrics, Mapping):
            raise TypeError(f"problem {name!r}: validation_step must return a dict of metrics, got {type(metrics).__name__}")
        results[name] = {k: float(v) for k, v in metrics.items()}
    return results


def split_loss(
    problem: Any, modules: ProblemModules, params: Mapping[str, Tensor], batch: Any, factor: float
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``problem.output_loss(batch)`` at ``params``, its ``loss_fn`` run at ``params`` too and scaled by ``factor``.

    ``loss_fn`` may read other problems (per-example weights from an upper level), so it runs
    with the same parameters substituted as the outputs were computed with.
    """
    outputs, loss_fn = call_user(problem.name, "output_loss", modules, params, problem.output_loss, batch)

    def scaled(z: Tensor) -> Tensor:
        loss = call_user(problem.name, "output_loss's loss_fn", modules, params, loss_fn, z)
        return loss * factor if factor != 1.0 else loss

    return outputs, scaled
