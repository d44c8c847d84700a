"""Run user code with substituted parameters for several problems at once.

Hypergradients need losses at parameters other than the ones stored in the modules (unrolled
weights, a perturbed ``w +- eps v``, detached copies for a Hessian-vector product). Every problem's
module is registered under the problem's name in one container module, so a single
``torch.func.functional_call`` substitutes parameters of any set of problems, keyed
``"<problem>.<param>"``, while the user's ``training_step`` runs unchanged and the user's modules
are never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call


class ProblemModules(nn.Module):
    """A container of every problem's module, named after the problems.

    Its ``forward(fn, *args)`` just calls ``fn(*args)``: what matters is that the call happens
    while ``functional_call`` has the substituted parameters in place.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def call_with(
    container: ProblemModules, params: Mapping[str, Tensor], fn: Callable[..., Any], *args: Any
) -> Any:
    """``fn(*args)`` with ``params`` (keyed ``"<problem>.<param>"``) substituted in every module."""
    return functional_call(container, dict(params), (fn, *args), strict=False)
