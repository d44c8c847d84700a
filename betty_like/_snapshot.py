"""The immutable snapshot of every level that the engine hands to the traversal."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .graph import Graph
from .hypergrad import Level, Program
from .optim import Params
from .problem import Problem


def snapshot(
    graph: Graph,
    setups: Mapping[str, Any],
    open_windows: set[str],
    current: Params,
    loss_of: Callable[..., Callable[[Params], Any]],
    wraps_of: Callable[[str], tuple[Callable, Callable, Callable]],
    copies: bool,
    hvps: Mapping[str, Any] | None = None,
    ranks: int = 1,
) -> Program:
    """A :class:`~betty_like.hypergrad.Program` of every problem at its ``current`` parameters.

    With ``copies`` the leaves of problems without an open window enter as copies (still
    differentiable to the leaves): a graph kept by an unrolled step then survives their in-place
    optimizer steps. ``loss_of(name)`` is the problem's loss as the traversal calls it (``loss_of(name,
    split=True)``: its ``output_loss``, given to problems that define one); ``wraps_of`` its push and
    matvec wrappers and its solves' ``shared`` (precision, data parallel); ``hvps`` the problems'
    compiled Hessian-vector products (``compile_hypergrad``); ``ranks`` the data-parallel processes.
    """
    levels = {}
    for name, setup in setups.items():
        windowed = name in open_windows
        if not windowed:
            setup.functional.reload_state()  # the user's optimizer may have stepped since
        params = {k: current[k].clone() if copies and not windowed else current[k] for k in setup.leaves}
        push_wrap, matvec_wrap, shared = wraps_of(name)
        problem = setup.problem
        outputs = loss_of(name, split=True) if type(problem).output_loss is not Problem.output_loss else None
        hvp = hvps[name].at if hvps and name in hvps else None
        levels[name] = Level(
            name, params, loss_of(name), setup.method, problem.config, setup.functional, windowed, push_wrap,
            matvec_wrap, hvp=hvp, eigenvalue=setup.eigenvalue, shared=shared, outputs=outputs, module=problem.module,
            memo=setup.memo, ranks=ranks,
        )
    return Program(graph, levels)
