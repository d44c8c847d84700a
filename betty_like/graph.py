"""The dependency graph between problems: who feeds whom, who reads whom, in what order.

Two kinds of edges, both given as ``{problem: [problems]}``:

* ``u2l`` (upper to lower): the upper problem's parameters appear in the lower problem's loss,
  so the lower solution is a function of them.
* ``l2u`` (lower to upper): the upper problem's loss reads the lower problem's solution, so the
  upper gradient flows back through it by the lower problem's hypergradient method.

An ``l2u`` edge ``L -> U`` is only meaningful if ``L`` depends on ``U`` (``U`` reaches ``L`` by
``u2l`` edges), and a ``u2l`` edge ``U -> L`` is only useful if ``U`` reads some solution at or
below ``L``; both are checked, as are cycles and unknown names, before the first step.
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


def _topological_order(names: list[str], edges: dict[str, list[str]], kind: str) -> list[str]:
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
        raise ValueError(
            f"the {kind} edges form a cycle among problems {cycle}: a dependency graph must be acyclic"
        )
    return order


class Graph:
    """Validated ``u2l`` / ``l2u`` edges with the queries the engine and the hypergradients need."""

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
        self.order = _topological_order(self.names, self.u2l, "u2l")
        _topological_order(self.names, self.l2u, "l2u")
        self._descendants = {n: self._reach(n) for n in self.names}
        self._uppers = {n: [u for u in self.names if n in self.u2l[u]] for n in self.names}
        self._lowers = {n: [low for low in self.names if n in self.l2u[low]] for n in self.names}
        self._leaves = [n for n in self.names if not self._lowers[n]]
        self._check_partners()

    def _reach(self, start: str) -> set[str]:
        seen, stack = set(), list(self.u2l[start])
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(self.u2l[node])
        return seen

    def _check_partners(self) -> None:
        for lower, uppers in self.l2u.items():
            for upper in uppers:
                if lower not in self._descendants[upper]:
                    raise ValueError(
                        f"l2u edge {lower!r} -> {upper!r} has no u2l partner: {upper!r}'s parameters do not "
                        f"reach {lower!r}'s loss, so its solution does not depend on them. Add "
                        f"'u2l': {{{upper!r}: [{lower!r}]}} or remove the l2u edge."
                    )
        for upper, lowers in self.u2l.items():
            readers = {upper} | self._ancestors(upper)
            for lower in lowers:
                below = {lower} | self._descendants[lower]
                if not any(below & set(self.lowers(r)) for r in readers):
                    raise ValueError(
                        f"u2l edge {upper!r} -> {lower!r} has no l2u partner: neither {upper!r} nor any problem above "
                        f"it reads a solution at or below {lower!r}, so no gradient would flow through the edge. Add "
                        f"'l2u': {{{lower!r}: [{upper!r}]}} or remove the u2l edge."
                    )

    def _ancestors(self, name: str) -> set[str]:
        return {n for n in self.names if name in self._descendants[n]}

    def uppers(self, name: str) -> list[str]:
        """Problems whose parameters appear in ``name``'s loss."""
        return list(self._uppers[name])

    def lowers(self, name: str) -> list[str]:
        """Problems whose solutions ``name``'s loss reads."""
        return list(self._lowers[name])

    def readers(self, name: str) -> list[str]:
        """Problems that read ``name``'s solution (its l2u targets)."""
        return list(self.l2u[name])

    def descendants(self, name: str) -> set[str]:
        """Problems whose solutions depend on ``name``'s parameters (reachable by u2l edges)."""
        return set(self._descendants[name])

    def leaves(self) -> list[str]:
        """Problems that read no lower solution: the engine steps them every iteration."""
        return list(self._leaves)
