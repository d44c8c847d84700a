"""``check_hypergradient``: how far a hypergradient method is from a reference, on the user's setup.

It recomputes an upper problem's hypergradient at the engine's current state twice, once with the
method under test and once with a reference, and reports relative error, cosine similarity and the
linear solvers' residual histories. Nothing is stepped and no parameter changes.

References:

* ``"exact"``: implicit differentiation with each lower problem's Hessian materialised
  (one Hessian-vector product per parameter) and solved densely in float64. Exact for the current
  lower parameters, for models of up to a few thousand parameters.
* ``"unroll"``: reverse mode through many steps of each lower problem's own optimizer update at its
  current point (the fixed-point iteration run to convergence). Costs one product per step, so it
  scales to large models; it equals ``"exact"`` when the lower problems are at a stationary point.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .hypergrad import METHODS, HypergradInfo, Method, Program, get_method, hypergradient
from .hypergrad._implicit import gradient_residual, root_push
from .hypergrad._linsolve import dense
from .hypergrad._tree import Params, dot, norm

if TYPE_CHECKING:
    from .engine import Engine

_DENSE_LIMIT = 20_000


def _exact_push(ctx):
    size = sum(t.numel() for t in ctx.w.values())
    if size > _DENSE_LIMIT:
        raise ValueError(
            f"reference='exact' materialises a {size}x{size} Hessian, above the {_DENSE_LIMIT} parameter limit; "
            "use reference='unroll'"
        )
    return root_push(ctx, gradient_residual(ctx), dense, "exact", symmetric=True)


_REFERENCES = {
    "exact": (Method("exact", "dense float64 solve of the implicit system", _exact_push), {}),
    "unroll": (METHODS["fixed_point"], {"iterations": 10_000, "tol": 1e-14}),
}


@dataclass
class HypergradReport:
    """The comparison for one upper problem.

    Attributes:
        problem: the upper problem whose hypergradient was compared.
        method: the method under test; ``reference`` the reference.
        relative_error: ``||g - g_ref|| / ||g_ref||``.
        cosine: cosine similarity between ``g`` and ``g_ref``.
        grad / reference_grad: the two hypergradients, keyed ``"<problem>.<param>"``.
        info / reference_info: per lower problem, the solver diagnostics (residual history).
    """

    problem: str
    method: str
    reference: str
    relative_error: float
    cosine: float
    grad: Params = field(repr=False)
    reference_grad: Params = field(repr=False)
    info: dict[str, HypergradInfo] = field(repr=False)
    reference_info: dict[str, HypergradInfo] = field(repr=False)

    def __str__(self) -> str:
        lines = [
            f"{self.problem}: {self.method} vs {self.reference}: relative error {self.relative_error:.3e}, "
            f"cosine {self.cosine:.6f}"
        ]
        for name, info in self.info.items():
            if info.solve is not None:
                lines.append(
                    f"  {name}: {info.solve.solver} {info.solve.iterations} iterations, residual {info.solve.residual:.3e}"
                )
        return "\n".join(lines)


def _hypergradient(engine: Engine, upper: str, method: Method, overrides: dict) -> tuple[Params, dict]:
    """``upper``'s hypergradient with ``method`` below it, every parameter a fresh leaf (open windows ignored)."""
    program = engine.program()
    below = set(engine.graph.responders(upper))
    levels = {}
    for name, level in program.levels.items():
        fresh = {k: t.detach().requires_grad_(True) for k, t in level.params.items()}
        if name in below:
            level = replace(level, method=method, config=replace(level.config, **overrides))
        levels[name] = replace(level, params=fresh, window=False)
    result = hypergradient(Program(program.graph, levels), upper)
    return {k: v.detach() for k, v in result.gradient.items()}, result.infos


def check_hypergradient(
    engine: Engine, method: str | None = None, reference: str = "exact", problem: str | None = None
) -> list[HypergradReport]:
    """Compare ``method`` with ``reference`` for ``problem`` (default: every problem that reads lower solutions).

    ``method`` defaults to each lower problem's configured one and is applied to every problem below
    the upper one; unrolled methods have no standalone push and are refused here.
    """
    if reference not in _REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; choose one of {sorted(_REFERENCES)}")
    uppers = [problem] if problem is not None else [n for n in engine.graph.names if engine.graph.lowers(n)]
    for name in uppers:
        if name not in engine.problems:
            raise ValueError(f"unknown problem {name!r}; problems: {sorted(engine.problems)}")
        if not engine.graph.lowers(name):
            raise ValueError(f"problem {name!r} reads no lower solution, so it has no hypergradient to check")
    reference_method, reference_overrides = _REFERENCES[reference]
    reports = []
    for upper in uppers:
        names = engine.graph.responders(upper)
        chosen = method or engine.problems[next(iter(sorted(names)))].config.hypergrad
        tested = get_method(chosen)
        if tested.unrolled:
            raise ValueError(
                f"method {chosen!r} differentiates through the training trajectory and has no standalone "
                "hypergradient at the current point; pass method= one of "
                f"{sorted(n for n, m in METHODS.items() if not m.unrolled)}"
            )
        with torch.enable_grad():
            grad, info = _hypergradient(engine, upper, tested, {})
            ref, ref_info = _hypergradient(engine, upper, reference_method, reference_overrides)
        difference = {k: grad[k] - ref[k] for k in ref}
        ref_norm = float(norm(ref))
        rel = float(norm(difference)) / ref_norm if ref_norm > 0 else float(norm(difference))
        denom = float(norm(grad)) * ref_norm
        cosine = float(dot(grad, ref)) / denom if denom > 0 else float("nan")
        reports.append(HypergradReport(upper, chosen, reference, rel, cosine, grad, ref, info, ref_info))
    return reports


__all__ = ["HypergradReport", "check_hypergradient"]
