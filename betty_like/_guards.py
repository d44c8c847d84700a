"""What stands between a computed step and its commit: failed solves and non-finite hypergradients.

Both are checked before anything changes, so a raise leaves the wave's transaction intact and the
user's optimizer never sees a NaN. Messages name the upper problem whose step it is, the lower
problem whose solve failed, the method, the residuals and the fix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .hypergrad import HypergradInfo
from .optim import Params

log = logging.getLogger("betty_like")

BUDGET_RESIDUAL = 1e-2  # an out-of-iterations solve above this relative residual is logged


class SolverFailure(FloatingPointError):
    """A linear solve in a hypergradient failed (diverged, NaN/inf, negative curvature)."""


class Where(NamedTuple):
    """The step being checked: the problem taking it, its step number and the engine iteration (1-based).

    A named tuple, not a dataclass: one is made for every step, and only an error message reads it.
    """

    problem: str
    step: int
    iteration: int

    def __str__(self) -> str:
        return f"at its step {self.step} (iteration {self.iteration})"


def _fix(info: HypergradInfo, lower: str) -> str:
    outcome = info.solve.outcome if info.solve is not None else ""
    if outcome == "diverged" and info.method == "fixed_point":
        return (
            f"the update of {lower!r}'s optimizer is no contraction here: lower its learning rate, set "
            f"ProblemConfig(damping=...) on {lower!r}, or use hypergrad='cg'"
        )
    if outcome == "diverged":
        return (
            f"the Neumann step is too large for the curvature: on {lower!r} set ProblemConfig(alpha=...) below "
            "2 / L (L the largest Hessian eigenvalue; alpha=None estimates it), add damping=..., or use "
            "hypergrad='cg' (its Hessian may also be indefinite here: cg handles that)"
        )
    if outcome == "negative_curvature":
        return f"{lower!r}'s Hessian is not positive definite here: set ProblemConfig(damping=...) on {lower!r}"
    return (
        f"a Hessian-vector product of {lower!r}'s training_step was NaN/inf: look for operations whose second "
        "derivative is undefined at the current point (sqrt or log at 0, torch.where with a NaN branch), "
        f"set ProblemConfig(damping=...) on {lower!r}, or use hypergrad='darts'"
    )


def check_solves(
    where: Where, infos: Mapping[str, HypergradInfo], configs: Mapping[str, Any], warn_once: Callable[[str, str], None]
) -> None:
    """Apply each lower problem's ``on_solver_failure`` to its solve; log budget-limited solves once."""
    for lower, info in infos.items():
        solve = info.solve
        if solve is None:
            continue
        if solve.failed:
            message = (
                f"problem {where.problem!r} {where}: the {info.method} solve through lower problem {lower!r} "
                f"failed: {solve.describe()}. Fix: {_fix(info, lower)}; or set "
                f"ProblemConfig(on_solver_failure='warn') on {lower!r} to use the result anyway"
            )
            policy = configs[lower].on_solver_failure
            if policy == "raise":
                raise SolverFailure(message)
            if policy == "warn":
                log.warning(message)
        elif solve.outcome == "out_of_iterations" and solve.residual > BUDGET_RESIDUAL:
            warn_once(
                f"budget:{where.problem}:{lower}",
                f"problem {where.problem!r} {where}: the {info.method} solve through {lower!r} used all its "
                f"iterations with relative residual {solve.residual:.3g} ({solve.describe()}); the hypergradient "
                f"is approximate: raise ProblemConfig(iterations=...) on {lower!r} if it must be accurate "
                "(logged once; status().diagnostics has every solve)",
            )


def summary_of(loss: Tensor, gradient: list[Tensor]) -> Tensor:
    """The loss followed by each gradient tensor's norm, in one 1-D tensor (NaN/inf where an entry is).

    One fused per-tensor norm (``_foreach_norm``, as ``clip_grad_norm_`` uses) and one stack: the
    eager counterpart of a captured step's in-graph
    :func:`~betty_like.execution._compiled_step.finiteness_summary`.
    """
    loss = loss.detach() if loss.dim() == 0 else loss.detach().reshape(())
    norms = torch._foreach_norm([g.detach() for g in gradient]) if gradient else []  # noqa: SLF001
    return torch.stack([loss, *(n if n.device == loss.device else n.to(loss.device) for n in norms)])


def _read(loss: Tensor, gradient: Params, summary: Tensor | None = None) -> tuple[float, list[str]]:
    """The loss as a float, and the gradient entries that are not finite: one host read for both.

    ``summary`` (:func:`summary_of`, or computed by a captured step) goes to the host with the loss,
    which the step needs as a float anyway (the record, the loss policy): the finite case costs the
    one read a hand-written loop's ``loss.item()`` makes. Only a non-finite (or overflowing) norm is
    looked at entry by entry.
    """
    keys = list(gradient)
    values = (summary_of(loss, [gradient[k] for k in keys]) if summary is None else summary).tolist()
    suspects = [k for k, norm in zip(keys, values[1:], strict=True) if not math.isfinite(norm)]
    if not suspects or not math.isfinite(values[0]):
        return values[0], []
    finite = torch.stack([torch.isfinite(gradient[k].detach()).all() for k in suspects]).tolist()
    return values[0], [k for k, ok in zip(suspects, finite, strict=True) if not ok]


def nonfinite_gradient(where: Where, bad: list[str], infos: Mapping[str, HypergradInfo]) -> str:
    """A message naming the non-finite entries ``bad`` of ``where.problem``'s gradient and where they came from."""
    inputs = sorted(n for n, i in infos.items() if i.solve is not None and i.solve.outcome == "non_finite_input")
    solves = sorted(n for n, i in infos.items() if i.solve is not None and i.solve.outcome == "non_finite")
    pitfall = (
        "a finite loss with a NaN gradient: e.g. torch.where(s > 2, sqrt(s - 1), 0) differentiates both "
        "branches; mask the input of sqrt/log, not its output"
    )
    if inputs:
        origin = (
            f"its own gradient: the derivative of {where.problem!r}'s loss with respect to the solution of "
            f"{inputs} is already NaN/inf ({pitfall})"
        )
    elif solves:
        origin = f"a Hessian-vector product in the solve through {solves} (its diagnostics say non_finite)"
    elif infos:
        origin = (
            f"its own gradient or a second-derivative product of a lower problem's loss ({sorted(infos)}); "
            "every linear solve was finite"
        )
    else:
        origin = f"its own gradient, an operation whose derivative is undefined at the current point ({pitfall})"
    what = "hypergradient" if infos else "gradient"
    return (
        f"problem {where.problem!r} {where}: its {what} is NaN/inf in {bad} while its loss is finite. "
        f"It came from {origin}. The optimizer was not stepped; set ProblemConfig(on_nonfinite='skip') on "
        f"{where.problem!r} to skip such steps"
    )


def guard(
    where: Where,
    loss: Tensor,
    gradient: Params,
    infos: Mapping[str, HypergradInfo],
    configs: Mapping[str, Any],
    warn_once: Callable[[str, str], None],
    scaled: bool = False,
    summary: Tensor | None = None,
) -> tuple[bool, float]:
    """Check a computed step before it commits; returns whether to skip it (``on_nonfinite="skip"``) and its loss as a float.

    Plain steps and hypergradient steps alike: the user's optimizer never sees a NaN/inf gradient.
    With ``scaled`` (fp16 loss scaling) an inf/NaN gradient is the scaler's overflow signal, which it
    handles itself (skip the step, halve the scale), so it is not an error here. A non-finite loss is
    not judged here but by :func:`loss_value`, with the float returned. ``summary``: the loss and
    gradient norms when the step computed them already (:func:`summary_of`).
    """
    check_solves(where, infos, configs, warn_once)
    if scaled:
        return False, float(loss.detach())  # the scaler speaks first
    value, bad = _read(loss, gradient, summary)
    if not bad:
        return False, value
    message = nonfinite_gradient(where, bad, infos)
    if configs[where.problem].on_nonfinite != "skip":
        raise FloatingPointError(message)
    log.warning(message.replace("The optimizer was not stepped", "Skipped"))
    return True, value


class WarnOnce:
    """``warn_once(key, message)``: log ``message`` the first time ``key`` is seen (one per engine)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            log.warning(message)


def loss_value(where: Where, value: float, policy: str, warn_once: Callable[[str, str], None]) -> float | None:
    """The loss ``value`` (read by :func:`guard`), or ``None`` if the step is to be skipped (``on_nonfinite="skip"``)."""
    if math.isfinite(value):
        return value
    name = where.problem
    if policy == "skip":
        warn_once(f"skip:{name}", f"problem {name!r}: non-finite loss, skipping its steps (see status().skipped)")
        return None
    raise FloatingPointError(
        f"problem {name!r}: training_step returned {value} at iteration {where.iteration} (its step "
        f"{where.step}); fix the loss, lower the learning rate, or set ProblemConfig(on_nonfinite='skip')"
    )
