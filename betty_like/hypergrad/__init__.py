"""Hypergradient methods: how an upper problem's gradient passes through a lower solution.

Each method is registered in :data:`METHODS` by name. Two families:

* *unrolled* methods (``unroll``, ``first_order``) take the lower problem's steps differentiably;
  the gradient then flows by reverse mode through those steps, so they have no push function.
* *pushing* methods (``neumann``, ``cg``, ``fixed_point``, ``darts``, ``sama``) work at the current
  lower solution: ``hypergrad(ctx) -> (grads on lam, info)``, a pure function of a
  :class:`HypergradContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import cg, darts, fixed_point, neumann, sama
from ._context import HypergradContext, HypergradInfo
from ._linsolve import SolveInfo, conjugate_gradient, dense
from ._linsolve import neumann as neumann_series
from ._tree import Params

Push = Callable[[HypergradContext], tuple[Params, HypergradInfo]]


@dataclass(frozen=True)
class Method:
    """A registered hypergradient method.

    Attributes:
        name: the ``ProblemConfig.hypergrad`` value.
        push: the pure push function, or ``None`` for unrolled methods.
        through_w: for unrolled methods, whether the steps are differentiated with respect to the
            lower parameters themselves (``unroll``) or only through the upper ones (``first_order``).
        second_order: whether it needs double backward through the lower problem's model.
    """

    name: str
    push: Push | None
    through_w: bool = True
    second_order: bool = True

    @property
    def unrolled(self) -> bool:
        return self.push is None


METHODS: dict[str, Method] = {
    "unroll": Method("unroll", None, through_w=True),
    "first_order": Method("first_order", None, through_w=False),
    "darts": Method("darts", darts.hypergrad, second_order=False),
    "sama": Method("sama", sama.hypergrad, second_order=False),
    "neumann": Method("neumann", neumann.hypergrad),
    "cg": Method("cg", cg.hypergrad),
    "fixed_point": Method("fixed_point", fixed_point.hypergrad),
}


def get_method(name: str) -> Method:
    """Look a method up by name; unknown names raise ``ValueError`` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown hypergradient method {name!r}; choose one of {sorted(METHODS)}") from None


__all__ = [
    "METHODS",
    "HypergradContext",
    "HypergradInfo",
    "Method",
    "SolveInfo",
    "conjugate_gradient",
    "dense",
    "get_method",
    "neumann_series",
]
