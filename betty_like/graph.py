"""The dependency graph between problems: whose solution responds to whose parameters, and who reads whom.

Edges keep Betty's meaning and are given as ``{problem: [problems]}``; no edge needs a partner:

* ``u2l`` (upper to lower) ``U -> L``: ``U``'s parameters appear in ``L``'s loss, so ``L``'s solution
  responds to them.
* ``l2u`` (lower to upper) ``L -> U``: ``U``'s loss reads ``L``'s solution. If ``L``'s solution
  responds to ``U``'s parameters (by any path), ``U`` differentiates through ``L``'s best response:
  ``L`` is one of ``U``'s *lowers*. Otherwise ``U``'s own solution responds to ``L``'s (Betty's
  learning-by-ignoring: ``finetune`` reads ``pretrain``, whose solution does not depend on
  ``finetune``).

From the edges the graph derives the *response* relation (``inputs`` / ``dependents``): which
solutions move when a problem's parameters move. A problem whose lowers respond to some other
problem ``Z`` responds to ``Z`` too (its best response is taken through them). The ``l2u`` edges
alone decide the schedule: a problem steps once every problem it reads has reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def _name_of(item: Any) -> str:
    return item if isinstance(item, str) else getattr(item, "name", repr(item))


def _normalise(edges: Mapping[Any, Iterable[Any]] | None, kind: str, known: set[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {name: [] for name in known}
    for source, targets in (edges or {}).items():
        src = _name_of(source)
        if isinstance(targets, (str, bytes)) or not isinstance(targets, Iterable):
            targets = [targets]
        for target in targets:
            dst = _name_of(target)
            for name in (src, dst):
                if name not in known:
                    raise ValueError(
                        f"{kind} edge {src!r} -> {dst!r} names unknown problem {name!r}; "
                        f"problems given to the engine: {sorted(known)}"
                    )
            if src == dst:
                raise ValueError(f"{kind} edge {src!r} -> {dst!r} points a problem at itself: remove it")
            if dst not in out[src]:
                out[src].append(dst)
    return out


def _topological_order(names: list[str], edges: Mapping[str, Iterable[str]], what: str) -> list[str]:
    """Kahn's algorithm, sources first, ties in the order problems were given; names a cycle if any."""
    indegree = {n: 0 for n in names}
    for src in names:
        for dst in edges[src]:
            indegree[dst] += 1
    ready = [n for n in names if indegree[n] == 0]
    order = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for dst in edges[node]:
            indegree[dst] -= 1
            if indegree[dst] == 0:
                ready.append(dst)
    if len(order) < len(names):
        cycle = [n for n in names if n not in order]
        raise ValueError(f"{what} form a cycle among problems {cycle}: a dependency graph must be acyclic")
    return order


def _reach(edges: Mapping[str, Iterable[str]], start: str) -> set[str]:
    seen: set[str] = set()
    stack = list(edges[start])
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(edges[node])
    return seen


class Graph:
    """Validated ``u2l`` / ``l2u`` edges and the response relation derived from them (immutable after init)."""

    def __init__(
        self, names: list[str], dependencies: Mapping[str, Mapping[Any, Iterable[Any]]] | None
    ) -> None:
        dependencies = dict(dependencies or {})
        unknown = set(dependencies) - {"u2l", "l2u"}
        if unknown:
            raise ValueError(f"dependencies has unknown keys {sorted(unknown)}: use 'u2l' and 'l2u'")
        known = set(names)
        self.names = list(names)
        self.u2l = _normalise(dependencies.get("u2l"), "u2l", known)
        self.l2u = _normalise(dependencies.get("l2u"), "l2u", known)
        _topological_order(self.names, self.u2l, "the u2l edges")
        schedule = _topological_order(self.names, self.l2u, "the l2u edges")
        self._lowers: dict[str, list[str]] = {n: [] for n in self.names}
        responds = {n: list(self.u2l[n]) for n in self.names}  # responds[x]: solutions that respond to x
        for source in schedule:  # a reader's own inputs are known before its outgoing edges are classified
            self._take_lowers_inputs(source, responds)
            for reader in self.l2u[source]:
                if reader in _reach(responds, source) or reader == source:
                    continue
                if source in _reach(responds, reader):
                    self._lowers[reader].append(source)
                else:
                    responds[source].append(reader)
        for name in self.names:
            self._take_lowers_inputs(name, responds)
        self.order = _topological_order(self.names, responds, "the response relations (u2l edges and l2u reads)")
        self._responds = responds
        self._dependents = {n: _reach(responds, n) for n in self.names}
        self._inputs = {n: [m for m in self.names if n in responds[m]] for n in self.names}
        self._responders = {n: self._responders_of(n) for n in self.names}
        self._consumed = {n: self._consumed_by(n) for n in self.names}
        self._leaves = [n for n in self.names if not self.reads(n)]  # asked at every iteration
        self._check_u2l_carries_gradient()

    def _take_lowers_inputs(self, name: str, responds: dict[str, list[str]]) -> None:
        """``name`` responds to whatever its lowers respond to (other than ``name`` and those below it)."""
        for lower in self._lowers[name]:
            below = _reach(responds, name)
            for other in self.names:
                if lower in responds[other] and other != name and other not in below and name not in responds[other]:
                    responds[other].append(name)

    def _responders_of(self, name: str) -> list[str]:
        """Solutions substituted by best responses in ``name``'s hypergradient: its lowers and what they respond to below ``name``."""
        below = self._dependents[name]
        needed, stack = set(), list(self._lowers[name])
        while stack:
            node = stack.pop()
            if node in below and node not in needed:
                needed.add(node)
                stack.extend(self.inputs(node))
        return [n for n in self.order if n in needed]

    def _consumed_by(self, root: str) -> set[str]:
        """Responders of ``root`` and, through middle levels, of its responders: all ``root``'s hypergradient reads."""
        reached, stack = set(), [root]
        while stack:
            for lower in self._responders[stack.pop()]:
                if lower not in reached:
                    reached.add(lower)
                    stack.append(lower)
        return reached

    def _check_u2l_carries_gradient(self) -> None:
        """Every ``u2l`` edge ``U -> L`` lies on some problem's hypergradient: both ends respond to it (or ``U`` is it)."""
        used = {(upper, lower) for root in self.names for lower in self._consumed[root] for upper in self._consumed[root] | {root}}
        for upper, lowers in self.u2l.items():
            for lower in lowers:
                if (upper, lower) not in used:
                    raise ValueError(
                        f"u2l edge {upper!r} -> {lower!r} carries no gradient: no problem's loss reads {lower!r}'s "
                        f"solution (or one that responds to it) while differentiating with respect to {upper!r}'s "
                        f"parameters. Add 'l2u': {{{lower!r}: [{upper!r}]}} if {upper!r}'s loss reads it, or remove "
                        "the u2l edge."
                    )

    def lowers(self, name: str) -> list[str]:
        """Problems whose best responses to ``name`` its loss reads: ``name``'s hypergradient goes through them."""
        return list(self._lowers[name])

    def responders(self, name: str) -> list[str]:
        """Every solution replaced by its best response in ``name``'s hypergradient, in response order."""
        return list(self._responders[name])

    def consumed(self, name: str) -> set[str]:
        """Every solution ``name``'s hypergradient differentiates through, at any depth (responders of responders)."""
        return set(self._consumed[name])

    def inputs(self, name: str) -> list[str]:
        """Problems whose parameters ``name``'s solution responds to directly."""
        return list(self._inputs[name])

    def dependents(self, name: str) -> set[str]:
        """Problems whose solutions respond to ``name``'s parameters, by any path."""
        return set(self._dependents[name])

    def reads(self, name: str) -> list[str]:
        """Problems whose solutions ``name``'s loss reads (its l2u sources): it steps after they report."""
        return [n for n in self.names if name in self.l2u[n]]

    def readers(self, name: str) -> list[str]:
        """Problems that read ``name``'s solution (its l2u targets)."""
        return list(self.l2u[name])

    def leaves(self) -> list[str]:
        """Problems that read no other solution: the engine steps them every iteration."""
        return list(self._leaves)
