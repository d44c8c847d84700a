"""Hypergradient methods and the traversal that composes them over a problem graph.

Every method is one module with a capability record (:class:`Method`); :data:`METHODS` is the one
list of them, and ``ProblemConfig.hypergrad`` is checked against it. Two families:

* *unrolled* methods (``unroll``, ``first_order``) take the lower problem's steps differentiably;
  the gradient flows by reverse mode through those steps (:mod:`.unroll`).
* *pushing* methods (``neumann``, ``cg``, ``kfac``, ``fixed_point``, ``darts``, ``sama``) work at the current
  lower solution: ``push(ctx) -> (v^T dw*/dx, info)``, a pure function of a :class:`HypergradContext`.

:func:`hypergradient` (:mod:`.total_derivative`) is the traversal.
"""

from __future__ import annotations

from . import cg, darts, first_order, fixed_point, kfac, neumann, sama, unroll
from ._context import HypergradContext, HypergradInfo
from ._curvature import gauss_newton
from ._kfac import blocks_of, kronecker_factors
from ._linsolve import CurvatureEstimate, LinearSystem, SolveInfo, conjugate_gradient, dense, minres
from ._linsolve import neumann as neumann_series
from ._method import Method
from .total_derivative import Hypergradient, Level, Program, hypergradient

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        unroll.METHOD,
        first_order.METHOD,
        darts.METHOD,
        sama.METHOD,
        neumann.METHOD,
        cg.METHOD,
        fixed_point.METHOD,
        kfac.METHOD,
    )
}


def get_method(name: str) -> Method:
    """Look a method up by name; unknown names raise ``ValueError`` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown hypergradient method {name!r}; choose one of {list(METHODS)}") from None


__all__ = [
    "METHODS",
    "CurvatureEstimate",
    "HypergradContext",
    "HypergradInfo",
    "Hypergradient",
    "Level",
    "LinearSystem",
    "Method",
    "Program",
    "SolveInfo",
    "conjugate_gradient",
    "blocks_of",
    "dense",
    "gauss_newton",
    "get_method",
    "hypergradient",
    "kronecker_factors",
    "minres",
    "neumann_series",
]
