"""What a push is given: pure functions and tensors, never a Problem or the engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ._linsolve import CompiledOperator, CurvatureEstimate, MatVec, SolveInfo
from ._tree import Params

if TYPE_CHECKING:
    from ..optim import FunctionalOptimizer


def _identity(matvec: MatVec) -> MatVec:
    return matvec


@dataclass(frozen=True)
class HypergradContext:
    """Everything needed to push a vector ``v`` through one lower problem's best response ``w*(x)``.

    Attributes:
        owner: the lower problem's name (for messages).
        objective: ``f(w, x)``, the lower problem's loss on its current batch with its own
            parameters ``w`` and the parameters ``x`` it responds to substituted. With
            ``nested="total"`` the solutions of its own lowers are their best responses to ``w`` (and
            ``x``), so its stationarity condition is the total one.
        w: the lower problem's parameters at which to differentiate (they require grad).
        x: the parameters its solution responds to (they require grad), keyed ``"<problem>.<param>"``.
        v: the vector on ``w`` to push.
        config: the lower problem's :class:`~betty_like.ProblemConfig`.
        optimizer: a pure view of its own optimizer (update map, per-group learning rates, moments).
        create_graph: the push itself is differentiated further (a deeper level's stationarity).
        matvec_wrap: applied to every Hessian-vector product map: the place for precision and
            cross-process reduction.
        compiled_hvp: ``() -> u -> H_ww u``, the objective's Hessian-vector product captured with
            ``torch.compile`` at ``(w, x)``, or ``None`` (returned, or given) where eager products are used.
            Only a solver's own iterations use it: their products are never differentiated. It can also
            run them as captured blocks (:class:`~._linsolve.CompiledOperator`).
        eigenvalue: the lower problem's kept estimate of its largest Hessian eigenvalue (Neumann's
            ``alpha=None``), shared by its solves across steps; ``None``: estimate at every solve.
        shared: a cotangent reaching a linear solve in a backward pass, as the adjoint system's
            right-hand side (the mean over ranks under data parallel; see
            :class:`~._linsolve.LinearSystem`).
        outputs: ``(w, x) -> (outputs, loss_fn)``, the objective split into the model's outputs and a
            loss of them (the problem's ``output_loss``), for Gauss-Newton curvature and KFAC; ``None``
            when the problem does not define the split.
        module: the lower problem's module (KFAC finds its Linear and Conv2d layers there).
        memo: a dict the lower problem keeps across steps for what a method reuses (KFAC factors).
        ranks: data-parallel processes: every derivative of ``objective`` here is ``1 / ranks`` of the
            global one (its average over ranks; :mod:`betty_like.distributed`), the same on every rank.
    """

    owner: str
    objective: Callable[[Params, Params], Tensor]
    w: Params
    x: Params
    v: Params
    config: Any
    optimizer: FunctionalOptimizer
    create_graph: bool = False
    matvec_wrap: Callable[[MatVec], MatVec] = field(default=_identity)
    compiled_hvp: Callable[[], CompiledOperator | None] | None = None
    eigenvalue: CurvatureEstimate | None = None
    shared: Callable[[Params], Params] = field(default=_identity)
    outputs: Callable[[Params, Params], tuple[Tensor, Callable[[Tensor], Tensor]]] | None = None
    module: nn.Module | None = None
    memo: dict[str, Any] = field(default_factory=dict)
    ranks: int = 1


@dataclass
class HypergradInfo:
    """Diagnostics of one push: the lower problem, the method, and the linear solve if there was one."""

    problem: str
    method: str
    solve: SolveInfo | None = None
