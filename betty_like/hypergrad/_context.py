"""What a hypergradient method is given: pure functions and tensors, never a Problem."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from ..config import ProblemConfig
from ..optim import FunctionalOptimizer
from ._linsolve import MatVec, SolveInfo
from ._tree import Params


def _identity(matvec: MatVec) -> MatVec:
    return matvec


@dataclass(frozen=True)
class HypergradContext:
    """Everything needed to push a vector ``v`` through one lower problem's best response.

    Attributes:
        inner_loss: ``f(w, lam)``, the lower problem's loss on its current batch, with its own
            parameters ``w`` and the upper parameters ``lam`` substituted (other problems fixed).
        w: the lower problem's current parameters (detached), keyed ``"<problem>.<param>"``.
        lam: the upper parameters that appear in ``f`` (detached), keyed the same way.
        v: the vector on ``w`` to push, ``dF/dw`` for an upper loss ``F``.
        config: the lower problem's config (solver iterations, tolerance, alpha, damping, ...).
        optimizer: a pure view of the lower problem's own optimizer (update map, learning rate,
            Adam moments).
        matvec_wrap: applied to every Hessian-vector product map: the place for damping, precision
            and cross-process all-reduce.
    """

    inner_loss: Callable[[Params, Params], Tensor]
    w: Params
    lam: Params
    v: Params
    config: ProblemConfig
    optimizer: FunctionalOptimizer
    matvec_wrap: Callable[[MatVec], MatVec] = field(default=_identity)


@dataclass
class HypergradInfo:
    """Diagnostics of one push: the method, and the linear solve if there was one."""

    method: str
    solve: SolveInfo | None = None
