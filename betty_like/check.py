"""``check_hypergradient``: how far a hypergradient method is from a reference, on the user's setup.

It recomputes an upper problem's hypergradient at the engine's current state twice, once with the
method under test and once with a reference, and reports relative error, cosine similarity and the
linear solvers' outcomes and residual histories. It changes nothing: no batch is drawn for good (a
problem without a current batch borrows its next one and puts it back), and parameters, buffers
(BatchNorm statistics), optimizer state and every random generator are bit-identical afterwards.

References:

* ``"exact"``: implicit differentiation with each lower problem's Hessian materialised
  (one Hessian-vector product per parameter) and solved densely in float64, **undamped** whatever
  the problem's ``damping``: a reference that shared the damping would bless a damped answer (a
  wrong-sign damped CG result scored 1e-16). The bias the damping causes is reported separately
  (``damping_bias``). Exact for the current lower parameters, up to 20,000 parameters.
* ``"unroll"``: training unrolled. Each lower problem takes ``unroll_steps`` differentiable steps of
  its own optimizer from its current weights and optimizer state, the upper loss is evaluated where
  they end, and reverse mode goes through every step (:mod:`betty_like._unroll_reference`). Converged,
  it is the hypergradient at the lower solution even when the lower problem is not there yet; memory
  grows with the number of steps. Two-level only (lower problems that read no lower solution).
* ``"fixed_point"``: implicit differentiation of each lower problem's optimizer update at its current
  point, the linear system solved by up to 10,000 fixed-point iterations (reverse mode through the
  update map, at fixed weights: no training happens). Costs one product per iteration, so it scales
  to large models; it equals ``"exact"`` when the lower problems are at a stationary point and the
  update contracts. (Before, ``"unroll"`` named this.)
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._run_state import random_states, restore_random_states
from ._unroll_reference import unrolled_hypergradient
from .hypergrad import METHODS, HypergradInfo, Method, Program, get_method, hypergradient
from .hypergrad._implicit import gradient_residual, root_push
from .hypergrad._linsolve import dense
from .hypergrad._tree import Params, dot, norm

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("betty_like")

_DENSE_LIMIT = 20_000


def _exact_push(ctx):
    size = sum(t.numel() for t in ctx.w.values())
    if size > _DENSE_LIMIT:
        raise ValueError(
            f"reference='exact' materialises a {size}x{size} Hessian, above the {_DENSE_LIMIT} parameter limit; "
            "use reference='fixed_point'"
        )
    return root_push(ctx, gradient_residual(ctx), dense, "exact", symmetric=True)


_REFERENCES = {
    "exact": (Method("exact", "dense float64 solve of the implicit system", _exact_push), {"damping": 0.0}),
    "fixed_point": (METHODS["fixed_point"], {"iterations": 10_000, "tol": 1e-14, "damping": 0.0}),
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
        info / reference_info: per lower problem, the solver diagnostics (outcome, residual history).
        damping_bias: ``||g_damped - g_exact|| / ||g_exact||`` for the exact reference computed with
            the lower problems' own ``damping`` (``None`` when none is damped or the reference is not exact).
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
    damping_bias: float | None = None

    def __str__(self) -> str:
        lines = [
            f"{self.problem}: {self.method} vs {self.reference}: relative error {self.relative_error:.3e}, "
            f"cosine {self.cosine:.6f}"
        ]
        if self.damping_bias is not None:
            lines.append(f"  damping alone moves the exact hypergradient by {self.damping_bias:.3e} (relative)")
        for name, info in self.info.items():
            if info.solve is not None:
                lines.append(f"  {name} ({info.method}): {info.solve.describe()}")
        return "\n".join(lines)


def _hypergradient(engine: Engine, upper: str, method: Method | None, overrides: dict) -> tuple[Params, dict]:
    """``upper``'s hypergradient with ``method`` below it (``None``: each lower's own), every parameter a fresh leaf."""
    program = engine.program()
    below = set(engine.graph.responders(upper))
    levels = {}
    for name, level in program.levels.items():
        fresh = {k: t.detach().requires_grad_(True) for k, t in level.params.items()}
        if name in below:
            level = replace(level, method=method or level.method, config=replace(level.config, **overrides))
        levels[name] = replace(level, params=fresh, window=False, eigenvalue=None)  # the engine's estimate stays as it was
    result = hypergradient(Program(program.graph, levels), upper)
    return {k: v.detach() for k, v in result.gradient.items()}, result.infos


@contextlib.contextmanager
def _untouched(engine: Engine) -> Iterator[None]:
    """Everything a check could change is put back: batches, parameters, buffers, optimizer state, RNG."""
    modules = [p.module for p in engine.problems.values() if p.module is not None]
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    saved = [t.detach().clone() for t in tensors]
    optimizers = [(p.optimizer, copy.deepcopy(p.optimizer.state_dict())) for p in engine.problems.values() if p.optimizer]
    randomness = random_states()
    try:
        with engine.borrowed_batches():
            yield
    finally:
        with torch.no_grad():
            for t, value in zip(tensors, saved, strict=True):
                t.copy_(value)
        for optimizer, state in optimizers:
            optimizer.load_state_dict(state)
        restore_random_states(randomness)


def _stochastic_layers(engine: Engine, names: list[str]) -> list[str]:
    """Layers in training mode whose output depends on randomness or on the batch's statistics."""
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)  # noqa: SLF001 (torch's bases of every dropout and batch-norm layer)
    found = []
    for name in names:
        module = engine.problems[name].module
        for path, layer in module.named_modules() if module is not None else ():
            if isinstance(layer, kinds) and layer.training and getattr(layer, "p", 1.0) != 0.0:
                found.append(f"{name}.{path or type(layer).__name__} ({type(layer).__name__})")
    return found


def _relative(a: Params, b: Params) -> float:
    difference = {k: a[k] - b[k] for k in b}
    size = float(norm(b))
    return float(norm(difference)) / size if size > 0 else float(norm(difference))


def check_hypergradient(
    engine: Engine,
    method: str | None = None,
    reference: str = "exact",
    problem: str | None = None,
    unroll_steps: int = 1000,
) -> list[HypergradReport]:
    """Compare ``method`` with ``reference`` for ``problem`` (default: every problem that reads lower solutions).

    ``method=None`` checks each lower problem with its own configured method; a name applies that
    method to every problem below the upper one. Unrolled methods have no standalone push at the
    current point and are refused here. ``reference`` is ``"exact"``, ``"fixed_point"`` or
    ``"unroll"`` (``unroll_steps`` steps of each lower problem's optimizer). The engine is left exactly
    as it was found.
    """
    if reference not in (*_REFERENCES, "unroll"):
        raise ValueError(f"unknown reference {reference!r}; choose one of {sorted([*_REFERENCES, 'unroll'])}")
    uppers = [problem] if problem is not None else [n for n in engine.graph.names if engine.graph.lowers(n)]
    for name in uppers:
        if name not in engine.problems:
            raise ValueError(f"unknown problem {name!r}; problems: {sorted(engine.problems)}")
        if not engine.graph.lowers(name):
            raise ValueError(f"problem {name!r} reads no lower solution, so it has no hypergradient to check")
    reports = []
    with _untouched(engine):
        for upper in uppers:
            if reference == "unroll":
                computed = partial(unrolled_hypergradient, engine, upper, unroll_steps)
            else:
                computed = partial(_hypergradient, engine, upper, *_REFERENCES[reference])
            reports.append(_check(engine, upper, method, reference, computed))
    return reports


def _check(
    engine: Engine, upper: str, method: str | None, reference: str, computed: Callable[[], tuple[Params, dict]]
) -> HypergradReport:
    names = engine.graph.responders(upper)
    own = {n: engine.problems[n].config.hypergrad for n in names}
    tested = get_method(method) if method is not None else None
    for name, chosen in own.items() if method is None else [("every lower", method)]:
        if get_method(chosen).unrolled:
            raise ValueError(
                f"method {chosen!r} ({name}) differentiates through the training trajectory and has no standalone "
                "hypergradient at the current point; pass method= one of "
                f"{sorted(n for n, m in METHODS.items() if not m.unrolled)}"
            )
    stochastic = _stochastic_layers(engine, [upper, *names])
    if stochastic:
        log.warning(
            f"check_hypergradient({upper!r}): {stochastic} make the hypergradient random (dropout draws, batch "
            "statistics), so the method and the reference differ by noise too: put those layers in eval mode for "
            "the check"
        )
    with torch.enable_grad():
        grad, info = _hypergradient(engine, upper, tested, {})
        ref, ref_info = computed()
        damped = any(engine.problems[n].config.damping > 0 for n in names) and reference == "exact"
        bias = None
        if damped:
            damped_ref, _ = _hypergradient(engine, upper, _REFERENCES["exact"][0], {})
            bias = _relative(damped_ref, ref)
    _check_reference(upper, reference, ref_info)
    denom = float(norm(grad)) * float(norm(ref))
    cosine = float(dot(grad, ref)) / denom if denom > 0 else float("nan")
    label = method if method is not None else ", ".join(f"{n}: {m}" for n, m in own.items())
    return HypergradReport(upper, label, reference, _relative(grad, ref), cosine, grad, ref, info, ref_info, bias)


def _check_reference(upper: str, reference: str, infos: dict[str, HypergradInfo]) -> None:
    """A failed reference raises; an unroll that had not converged is said in the log (it is still an unroll)."""
    for name, info in infos.items():
        if info.solve is None:
            continue
        if info.solve.failed:
            cause = (
                f"{name!r}'s optimizer diverges from here in {info.solve.iterations} steps"
                if reference == "unroll"
                else "its optimizer's update is no contraction here"
            )
            raise ValueError(
                f"the {reference!r} reference for {upper!r} failed at lower problem {name!r}: {info.solve.describe()}; "
                f"{cause}: use reference='exact'"
            )
        if reference == "unroll" and info.solve.outcome != "converged":
            log.warning(
                f"check_hypergradient({upper!r}): the unroll of {name!r} had not converged after {info.solve.iterations} "
                f"steps (last relative step {info.solve.residual:.3g}), so the reference is the hypergradient of that "
                "many steps, not of the lower solution: raise unroll_steps"
            )


__all__ = ["HypergradReport", "check_hypergradient"]
