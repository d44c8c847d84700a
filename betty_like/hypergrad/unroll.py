"""``unroll``: reverse mode through the lower problem's own differentiable optimizer steps.

An unrolled problem takes its steps in a *window*: weights and optimizer state computed by the pure
version of its optimizer (:mod:`betty_like.optim`), which keep their graph to every parameter the
steps read. The problems above it differentiate through the window instead of pushing through a
best response. The window starts from a copy of the problem's weights, so the user's module can
hold the latest values at all times, and closes (its state written to the user's optimizer) when a
problem it responds to takes a real step. Only the last ``truncate`` steps of each period between
reports keep a graph.

With ``ProblemConfig(unroll_memory="remat" | "mixed")`` a step keeps only its inputs instead of its
whole graph and runs again inside the backward pass (:mod:`~betty_like.hypergrad.unroll_memory`).

A middle problem unrolls through its own *hypergradient* steps: each step's gradient is the total
derivative through its lowers, taken with ``create_graph=True``.
"""

from __future__ import annotations

from ._method import Method
from ._tree import Params, detach
from .total_derivative import Hypergradient, Program, hypergradient


def keeps_graph(truncate: int | None, step_in_period: int, period: int) -> bool:
    """Whether step ``step_in_period`` (1-based) of a ``period``-step reporting period keeps its graph."""
    return truncate is None or step_in_period > period - truncate


def window_gradient(
    program: Program, root: str, weights: Params, keep_graph: bool, through_w: bool, create_graph: bool | None = None
) -> tuple[Hypergradient, Params]:
    """``(hypergradient at the window's weights, the weights the step starts from)``.

    With ``through_w`` (``unroll``) the gradient is a function of the weights themselves, so the
    Hessian terms in them stay; otherwise (``first_order``) it is taken at detached weights, so only
    its dependence on the upper parameters is differentiated. ``create_graph=False`` gives the same
    values as a kept step without building the graph of the gradient (a rematerialized step's first run).
    """
    origin = weights if keep_graph else detach(weights)
    if keep_graph and through_w:  # after truncated (graph-free) steps, start a fresh graph at the weights
        origin = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in origin.items()}
        start = origin
    else:
        start = {k: v.detach().requires_grad_(True) for k, v in origin.items()}
    create_graph = keep_graph if create_graph is None else create_graph
    result = hypergradient(program, root, start, create_graph=create_graph, detach_context=not keep_graph)
    return result, origin


METHOD = Method(
    "unroll",
    "reverse mode through the lower problem's differentiable optimizer steps",
    None,
    through_w=True,
    steps_optimizer=True,
)
