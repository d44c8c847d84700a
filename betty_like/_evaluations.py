"""Loss evaluations inside one step: user state advances as in a plain step, however many the method needs.

A hypergradient evaluates losses many times: the step's own forward, then the residuals of implicit
solves, darts' two perturbed copies, every level of a nested push. Each forward of a module in
training mode moves its BatchNorm running statistics (measured before this: over 10 lower steps
``num_batches_tracked`` reached 20 with unroll, 30 with cg/neumann, 40 with darts) and draws new
dropout masks, so the evaluations of one hypergradient see different functions: darts' two perturbed
evaluations then difference two masks, a nested push mixes masks across levels (the issue measured
five cg hypergradients at one state ranging from -8.2 to +0.16 with p = 0.5).

Inside :meth:`Evaluations.step` the first evaluation (the step's own forward) changes buffers as a
plain step would; whatever later evaluations do to buffers is undone when the step's computation
ends. A problem with ``ProblemConfig(fixed_randomness=True)`` has every evaluation of its loss in
the step start from the random state its first one started from (the same dropout masks), and the
generators end where the step's first evaluation left them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from ._run_state import random_states, restore_random_states


class Evaluations:
    """Guards the user's buffers and random state across the loss evaluations of one step."""

    def __init__(self, buffers: Iterable[torch.Tensor], problems: Mapping[str, Any]) -> None:
        self.buffers = list(buffers)
        self.fixed = {name for name, p in problems.items() if p.config.fixed_randomness}
        self.active = False
        self.saved: list[torch.Tensor] | None = None
        self.after_first: dict[str, Any] | None = None
        self.starts: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One step's computation; re-entrant (an inner use is part of the outer one)."""
        if self.active:
            yield
            return
        self.active, self.saved, self.after_first, self.starts = True, None, None, {}
        try:
            yield
        finally:
            if self.saved is not None:
                with torch.no_grad():
                    for buffer, value in zip(self.buffers, self.saved, strict=True):
                        if not torch.equal(buffer, value):  # an untouched buffer keeps its version (open graphs)
                            buffer.copy_(value)
            if self.after_first is not None and self.starts:
                restore_random_states(self.after_first)
            self.active = False

    def call(self, name: str, evaluate: Callable[[], Any]) -> Any:
        """``evaluate()``, the loss of problem ``name``, under the step's rules."""
        if not self.active:
            return evaluate()
        if name in self.fixed:
            if name in self.starts:
                restore_random_states(self.starts[name])
            else:
                self.starts[name] = random_states()
        result = evaluate()
        if self.saved is None:  # the step's own forward: what a plain step would leave
            self.saved = [b.detach().clone() for b in self.buffers]
            # only a fixed-randomness problem rewinds the generators, so only then is their state kept
            self.after_first = random_states() if self.fixed else None
        return result
