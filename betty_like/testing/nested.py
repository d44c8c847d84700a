"""Closed-form deeper graphs (float64) with exact total-derivative hypergradients.

Every level is a small quadratic (dimension 3, Hessian condition number about 2) whose best
response is written by hand with ``torch.linalg.solve`` as a differentiable function of the
levels above it. A middle level's best response is the argmin of its loss with its own lower
problems' best responses substituted (total stationarity). A problem's exact hypergradient is then
``torch.autograd.grad`` of its loss through those nested closed forms: plain torch, no engine.

Each builder returns a :class:`NestedCase` whose engine holds every module at its exact nested
solution (so gradients there are zero and nothing moves), with the exact hypergradients of the
problems under test. The closed forms themselves are a :class:`Reference`, usable without an
engine (the old engine rejects some of these graphs), so tests can check them against finite
differences and check that each best response really is stationary for the losses the problems use.

Edges keep Betty's meaning: ``u2l`` U->L means U's parameters appear in L's loss; ``l2u`` L->U
means U's loss reads L's solution. ``nested="partial"`` (Betty's rule, opt-in) differentiates a
middle problem's best response with its lower solutions held fixed in its Hessian;
:attr:`NestedCase.partial` holds that closed form where the builders define it (the chains).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from betty_like import Engine, EngineConfig, Problem, ProblemConfig

from .closed_form import DTYPE, Scalar, linear, regression_data

Values = dict[str, Tensor]
Loss = Callable[[Values, tuple], Tensor]
BestResponse = Callable[[Values], Tensor]
PartialResponse = Callable[[Values, Values], Tensor]

D = 3  # dimension of every level's parameter except learning-by-ignoring's per-example weights


# --------------------------------------------------------------------------- plain-torch building blocks
def fit(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Least squares ``0.5 * mean((x w - y)^2)``: Hessian ``gram(x)``, gradient ``gram(x) w - moment(x, y)``."""
    return 0.5 * ((x @ w - y) ** 2).mean()


def gram(x: Tensor) -> Tensor:
    return x.T @ x / len(x)


def moment(x: Tensor, y: Tensor) -> Tensor:
    return x.T @ y / len(x)


def eye() -> Tensor:
    return torch.eye(D, dtype=DTYPE)


@dataclass
class Reference:
    """A case's closed form in plain torch.

    Attributes:
        order: problems top-down: the free (top-level) problems first, then each problem after
            every problem its best response uses.
        reads: for each problem, the problems whose vectors its loss takes (its own included).
        losses: ``loss(values, batch)`` per problem; the engine's problems call the same functions.
        batches: each problem's one batch.
        free: values of the top-level problems' parameters.
        best: closed-form best response of each other problem from the values before it in ``order``.
        tested: problems whose hypergradients the case checks.
        partial: optional Betty-rule responses ``partial[mid](values, solution)`` of middle problems
            (the argmin of the mid loss with lower solutions frozen, tilted so that it passes through the
            solution): its derivative is ``-H_partial^-1 d(grad_w f_mid)/d(upper)``.
        linear: problems whose module is an ``nn.Linear`` (parameter ``weight`` of shape ``(1, D)``)
            instead of a :class:`Scalar` (parameter ``value``).
    """

    order: tuple[str, ...]
    reads: dict[str, tuple[str, ...]]
    losses: dict[str, Loss]
    batches: dict[str, tuple]
    free: Values
    best: dict[str, BestResponse]
    tested: tuple[str, ...]
    partial: dict[str, PartialResponse] = field(default_factory=dict)
    linear: frozenset[str] = frozenset()

    def solve(self, given: Mapping[str, Tensor], *, partial: Values | None = None) -> Values:
        """Every problem's value: ``given`` ones as they are, the rest by best response, top-down.

        With ``partial`` (the exact solution) the middle problems in :attr:`partial` use Betty's rule.
        """
        values = dict(given)
        for name in self.order:
            if name in values:
                continue
            if name in self.free:
                raise ValueError(f"the value of top-level problem {name!r} must be given")
            if partial is not None and name in self.partial:
                values[name] = self.partial[name](values, partial)
            else:
                values[name] = self.best[name](values)
        return values

    def loss(self, name: str, values: Mapping[str, Tensor]) -> Tensor:
        return self.losses[name]({r: values[r] for r in self.reads[name]}, self.batches[name])

    def solution(self) -> Values:
        """The exact nested solution (detached)."""
        with torch.no_grad():
            return self.solve(self.free)

    def reduced(
        self, name: str, value: Tensor, at: Mapping[str, Tensor] | None = None, *, partial: bool = False
    ) -> Tensor:
        """``name``'s loss as a function of its own ``value``.

        Problems before it in :attr:`order` stay at ``at`` (default: the solution); every problem after
        it is re-solved, so its derivative is the total derivative through every solution that depends on
        ``name``. ``partial=True`` swaps in Betty's rule for the middle problems in :attr:`partial`.
        """
        solution = self.solution()
        at = solution if at is None else at
        i = self.order.index(name)
        given = {n: at[n].detach() for n in self.order[:i]}
        given.update({n: at[n].detach() for n in self.free if n != name and n not in given})
        given[name] = value
        return self.loss(name, self.solve(given, partial=solution if partial else None))

    def hypergradient(
        self, name: str, at: Mapping[str, Tensor] | None = None, *, partial: bool = False
    ) -> Tensor:
        """Exact total derivative of ``name``'s loss w.r.t. its own vector (autograd through the closed forms)."""
        at = self.solution() if at is None else at
        leaf = at[name].detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self.reduced(name, leaf, at, partial=partial), leaf)
        return g

    def direct_gradient(self, name: str, at: Mapping[str, Tensor] | None = None) -> Tensor:
        """Gradient of ``name``'s loss w.r.t. its own vector with every other value held fixed."""
        at = self.solution() if at is None else at
        if name not in self.reads[name]:
            return torch.zeros_like(at[name])
        leaf = at[name].detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self.loss(name, {**at, name: leaf}), leaf)
        return g

    def hessians(self, name: str) -> tuple[Tensor, Tensor]:
        """(total, partial) Hessians of ``name``'s loss in its own vector at the solution."""
        solution = self.solution()
        total = torch.autograd.functional.hessian(lambda w: self.reduced(name, w), solution[name])
        fixed = torch.autograd.functional.hessian(
            lambda w: self.loss(name, {**solution, name: w}), solution[name]
        )
        return total, fixed


# --------------------------------------------------------------------------- engine side
class Level(Problem):
    """A problem whose ``training_step`` is ``loss(values, batch)``, ``values`` holding the current vector
    of each problem in ``reads`` (its own included), reached through the public attribute API."""

    def __init__(self, name: str, *, loss: Loss, reads: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._loss = loss
        self._reads = reads

    def training_step(self, batch):
        values = {n: _vector(self if n == self.name else getattr(self, n)) for n in self._reads}
        return self._loss(values, batch)


def _vector(problem: Problem) -> Tensor:
    module = problem.module
    return problem() if isinstance(module, Scalar) else module.weight.reshape(-1)


@dataclass
class NestedCase:
    """A ready engine at the exact nested solution and the exact hypergradients of ``uppers``.

    ``exact[name]`` (and ``partial[name]``, Betty's rule, where defined) is keyed like the engine's
    gradient dicts, ``"<problem>.<param>"``, in the parameter's shape. ``scale[name]`` is the norm to
    divide errors by: the larger of the exact hypergradient's norm and the plain gradient's norm with
    every other value held fixed (for a middle problem the exact hypergradient is zero at the solution,
    while an engine that ignores the paths through lower solutions returns the plain gradient).
    ``contraction[name]`` is ``1 - lr * mu`` for each lower/middle problem (worst of its total and
    partial Hessians), the rate at which its unrolled steps, Neumann series and fixed-point iteration converge.
    ``reference`` is the closed form the numbers came from; ``problems`` the engine's problems by name.
    """

    engine: Engine
    uppers: tuple[str, ...]
    exact: dict[str, dict[str, Tensor]]
    scale: dict[str, float]
    partial: dict[str, dict[str, Tensor]] | None
    contraction: dict[str, float]
    reference: Reference
    problems: dict[str, Problem]


def steps_for(contraction: float, tol: float = 1e-10) -> int:
    """Unrolled steps after which ``contraction ** steps < tol``."""
    return math.ceil(math.log(tol) / math.log(contraction))


def _middles(dependencies: Mapping[str, Mapping[str, list[str]]]) -> set[str]:
    """Problems that read a lower solution and whose own solution is read."""
    readers = {u for ups in dependencies["l2u"].values() for u in ups}
    return readers & set(dependencies["l2u"])


def build(
    ref: Reference,
    dependencies: Mapping[str, Mapping[str, list[str]]],
    methods: Mapping[str, str],
    *,
    nested: str | None = None,
    start: Mapping[str, Tensor] | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    **config: Any,
) -> NestedCase:
    """Wire ``ref`` into an :class:`Engine` at its exact solution.

    Args:
        methods: hypergrad method per lower/middle problem (``cg`` where not named).
        nested: passed as ``ProblemConfig(nested=...)`` to middle problems, only when given.
        start: values overriding the solution for some problems (exact hypergradients follow them).
        configs: extra ``ProblemConfig`` kwargs per problem name, over ``config`` (shared by every
            lower/middle problem). ``unroll``/``first_order`` problems without ``unroll_steps`` get
            enough steps for their unrolled Jacobian to converge (``steps_for``).
    """
    configs = configs or {}
    lowers = [n for n in ref.order if n not in ref.free]
    unknown = sorted(set(methods) - set(lowers)) + sorted(set(configs) - set(ref.order))
    if unknown:
        raise ValueError(f"unknown problems {unknown}: this case has {list(ref.order)}")
    solution = ref.solution()
    at = {**solution, **(start or {})}
    middles = _middles(dependencies)
    problems, contraction, unrolls = [], {}, 1
    for name in ref.order:
        value = at[name]
        module = linear(D, value) if name in ref.linear else Scalar(value)
        lr, kwargs = 0.0, {}
        if name not in ref.free:
            total, fixed = ref.hessians(name)
            eig_total, eig_fixed = torch.linalg.eigvalsh(total), torch.linalg.eigvalsh(fixed)
            lr = 1.0 / float(max(eig_total.max(), eig_fixed.max()))
            contraction[name] = 1.0 - lr * float(min(eig_total.min(), eig_fixed.min()))
            method = methods.get(name, "cg")
            kwargs = {"hypergrad": method, "iterations": 1000, **config, **configs.get(name, {})}
            if method in ("unroll", "first_order") and "unroll_steps" not in kwargs:
                kwargs["unroll_steps"] = steps_for(contraction[name])
            if nested is not None and name in middles:
                kwargs["nested"] = nested
        else:
            kwargs = dict(configs.get(name, {}))
        cfg = ProblemConfig(**kwargs)
        unrolls *= cfg.unroll_steps
        problems.append(
            Level(
                name,
                loss=ref.losses[name],
                reads=ref.reads[name],
                module=module,
                optimizer=torch.optim.SGD(module.parameters(), lr=lr),
                data=[ref.batches[name]],
                config=cfg,
            )
        )
    engine = Engine(problems, dependencies=dependencies, config=EngineConfig(train_iters=unrolls))
    params = {p.name: next(iter(p.module.named_parameters())) for p in problems}

    def keyed(name: str, g: Tensor) -> dict[str, Tensor]:
        key, param = params[name]
        return {f"{name}.{key}": g.detach().reshape(param.shape)}

    exact, scale = {}, {}
    for name in ref.tested:
        g = ref.hypergradient(name, at)
        exact[name] = keyed(name, g)
        scale[name] = max(float(g.norm()), float(ref.direct_gradient(name, at).norm()))
    partial = None
    if ref.partial and start is None:
        partial = {
            name: keyed(name, ref.hypergradient(name, partial=True))
            for name in ref.tested
            if name in ref.free
        }
    by_name = {p.name: p for p in problems}
    return NestedCase(engine, ref.tested, exact, scale, partial, contraction, ref, by_name)


# --------------------------------------------------------------------------- a. three-level chain
RHO = 2.0  # pull of each chain level towards the one above it


def _tilted_ridge(mid: str, top: str) -> PartialResponse:
    """Betty's rule for ``fit(lower) + 0.5 sum(exp(lam) w^2) + 0.5 |w - 1|^2`` with the lower frozen.

    Partial Hessian ``H(lam) = diag(exp(lam)) + I``; the tilted argmin
    ``argmin_w f(w, lower0, lam) - g0^T w`` with ``g0 = H(lam0) w0 - 1`` is ``H(lam)^-1 H(lam0) w0``,
    which equals ``w0`` at ``lam0`` and has derivative ``-H^-1 diag(exp(lam) w0)`` there.
    """

    def response(values: Values, solution: Values) -> Tensor:
        h0 = torch.exp(solution[top]) + 1.0
        return h0 * solution[mid] / (torch.exp(values[top]) + 1.0)

    return response


def chain_reference() -> Reference:
    """top(lam) -> mid(w_m) -> low(w_l).

    * low:  ``fit(w_l; Xa) + RHO/2 |w_l - w_m|^2``  ->  ``w_l* = c + J w_m``, ``H_l = Sa + RHO I``,
      ``c = H_l^-1 ra``, ``J = RHO H_l^-1``.
    * mid:  ``fit(w_l; Xc) + 0.5 sum(exp(lam) w_m^2) + 0.5 |w_m - 1|^2``, quadratic in low's solution.
      Total stationarity with ``w_l*(w_m)`` substituted: ``A w_m = b`` with
      ``A = J^T Sc J + diag(exp(lam)) + I``, ``b = J^T (rc - Sc c) + 1``.
    * top:  ``fit(w_m; Xd)``.
    """
    (xa, ya), (xc, yc), (xd, yd) = (regression_data(30, D, seed=s) for s in (20, 21, 22))
    h_l = gram(xa) + RHO * eye()
    c = torch.linalg.solve(h_l, moment(xa, ya))
    jac = RHO * torch.linalg.inv(h_l)

    def best_mid(v: Values) -> Tensor:
        a = jac.T @ gram(xc) @ jac + torch.diag(torch.exp(v["top"])) + eye()
        return torch.linalg.solve(a, jac.T @ (moment(xc, yc) - gram(xc) @ c) + 1.0)

    return Reference(
        order=("top", "mid", "low"),
        reads={"top": ("mid",), "mid": ("mid", "low", "top"), "low": ("low", "mid")},
        losses={
            "low": lambda v, b: fit(v["low"], *b) + 0.5 * RHO * ((v["low"] - v["mid"]) ** 2).sum(),
            "mid": lambda v, b: (
                fit(v["low"], *b)
                + 0.5 * (torch.exp(v["top"]) * v["mid"] ** 2).sum()
                + 0.5 * ((v["mid"] - 1.0) ** 2).sum()
            ),
            "top": lambda v, b: fit(v["mid"], *b),
        },
        batches={"low": (xa, ya), "mid": (xc, yc), "top": (xd, yd)},
        free={"top": torch.tensor([-0.3, 0.1, 0.4], dtype=DTYPE)},
        best={
            "mid": best_mid,
            "low": lambda v: torch.linalg.solve(h_l, moment(xa, ya) + RHO * v["mid"]),
        },
        tested=("top", "mid"),
        partial={"mid": _tilted_ridge("mid", "top")},
    )


CHAIN_EDGES = {"u2l": {"top": ["mid"], "mid": ["low"]}, "l2u": {"low": ["mid"], "mid": ["top"]}}


def three_level_chain(methods: Mapping[str, str], *, nested: str | None = None, **config: Any) -> NestedCase:
    """Case a, see :func:`chain_reference`. Tested: ``top`` (exact, and Betty's rule in ``partial``) and
    ``mid`` (its hypergradient through low is zero at the solution, its plain gradient is not)."""
    return build(chain_reference(), CHAIN_EDGES, methods, nested=nested, **config)


# --------------------------------------------------------------------------- b. four-level chain
def four_chain_reference() -> Reference:
    """top(lam) -> upper_mid(w_u) -> lower_mid(w_m) -> low(w_l).

    * low:       ``fit(w_l; Xa) + RHO/2 |w_l - w_m|^2``  ->  ``w_l* = c_l + J_l w_m`` (as in the three-level chain).
    * lower_mid: ``fit(w_l; Xb) + RHO/2 |w_m - w_u|^2``; with ``w_l*(w_m)`` substituted,
      ``A_m = J_l^T Sb J_l + RHO I``, ``w_m* = A_m^-1 (J_l^T (rb - Sb c_l) + RHO w_u) = c_m + J_m w_u``.
    * upper_mid: ``fit(w_m; Xc) + 0.5 sum(exp(lam) w_u^2) + 0.5 |w_u - 1|^2``; with ``w_m*(w_u)``,
      ``A_u = J_m^T Sc J_m + diag(exp(lam)) + I``, ``b_u = J_m^T (rc - Sc c_m) + 1``.
    * top:       ``fit(w_u; Xd)``.
    """
    (xa, ya), (xb, yb), (xc, yc), (xd, yd) = (regression_data(30, D, seed=s) for s in (30, 31, 32, 33))
    h_l = gram(xa) + RHO * eye()
    c_l = torch.linalg.solve(h_l, moment(xa, ya))
    j_l = RHO * torch.linalg.inv(h_l)
    a_m = j_l.T @ gram(xb) @ j_l + RHO * eye()
    c_m = torch.linalg.solve(a_m, j_l.T @ (moment(xb, yb) - gram(xb) @ c_l))
    j_m = RHO * torch.linalg.inv(a_m)

    def best_upper_mid(v: Values) -> Tensor:
        a_u = j_m.T @ gram(xc) @ j_m + torch.diag(torch.exp(v["top"])) + eye()
        return torch.linalg.solve(a_u, j_m.T @ (moment(xc, yc) - gram(xc) @ c_m) + 1.0)

    def pull(a: str, b: str) -> Callable[[Values], Tensor]:
        return lambda v: 0.5 * RHO * ((v[a] - v[b]) ** 2).sum()

    low_pull, mid_pull = pull("low", "lower_mid"), pull("lower_mid", "upper_mid")
    return Reference(
        order=("top", "upper_mid", "lower_mid", "low"),
        reads={
            "top": ("upper_mid",),
            "upper_mid": ("upper_mid", "lower_mid", "top"),
            "lower_mid": ("lower_mid", "low", "upper_mid"),
            "low": ("low", "lower_mid"),
        },
        losses={
            "low": lambda v, b: fit(v["low"], *b) + low_pull(v),
            "lower_mid": lambda v, b: fit(v["low"], *b) + mid_pull(v),
            "upper_mid": lambda v, b: (
                fit(v["lower_mid"], *b)
                + 0.5 * (torch.exp(v["top"]) * v["upper_mid"] ** 2).sum()
                + 0.5 * ((v["upper_mid"] - 1.0) ** 2).sum()
            ),
            "top": lambda v, b: fit(v["upper_mid"], *b),
        },
        batches={"low": (xa, ya), "lower_mid": (xb, yb), "upper_mid": (xc, yc), "top": (xd, yd)},
        free={"top": torch.tensor([0.2, -0.2, 0.3], dtype=DTYPE)},
        best={
            "upper_mid": best_upper_mid,
            "lower_mid": lambda v: torch.linalg.solve(a_m, a_m @ c_m + RHO * v["upper_mid"]),
            "low": lambda v: torch.linalg.solve(h_l, moment(xa, ya) + RHO * v["lower_mid"]),
        },
        tested=("top", "upper_mid", "lower_mid"),
        partial={"upper_mid": _tilted_ridge("upper_mid", "top")},
    )


FOUR_CHAIN_EDGES = {
    "u2l": {"top": ["upper_mid"], "upper_mid": ["lower_mid"], "lower_mid": ["low"]},
    "l2u": {"low": ["lower_mid"], "lower_mid": ["upper_mid"], "upper_mid": ["top"]},
}


def four_level_chain(methods: Mapping[str, str], *, nested: str | None = None, **config: Any) -> NestedCase:
    """Case b, see :func:`four_chain_reference`. Tested: ``top`` and both middle problems (zero at the solution).

    ``partial`` holds Betty's rule at ``upper_mid`` only: it matches an engine with ``nested="partial"`` on
    ``upper_mid`` alone (with it on ``lower_mid`` too, ``upper_mid``'s own gradient is no longer zero and it moves).
    """
    return build(four_chain_reference(), FOUR_CHAIN_EDGES, methods, nested=nested, **config)


# --------------------------------------------------------------------------- c. learning by ignoring
MU = 0.3  # pretrain's ridge


def ignoring_reference() -> Reference:
    """Betty's learning-by-ignoring: reweight(theta) -> pretrain(w_p) -> finetune(w_f).

    * pretrain: ``0.5 mean(s_i (x_i w_p - y_i)^2) + MU/2 |w_p|^2`` with ``s = sigmoid(theta)``, one weight per
      example (the first three targets are corrupted) -> ``w_p* = (X^T diag(s) X / n + MU I)^-1 X^T (s y) / n``.
    * finetune: ``fit(w_f; Xf) + RHO/2 |w_f - w_p|^2`` -> ``w_f* = (Sf + RHO I)^-1 (rf + RHO w_p)``.
    * reweight: ``fit(w_p; Xv1) + fit(w_f; Xv2)``: reads both, so theta reaches it through ``w_p*(theta)``
      directly and through ``w_f*(w_p*(theta))``.
    """
    n = 12
    xp, yp = regression_data(n, D, seed=40)
    yp = yp.clone()
    yp[:3] += 2.0
    (xf, yf), (xv1, yv1), (xv2, yv2) = (regression_data(30, D, seed=s) for s in (41, 42, 43))
    h_f = gram(xf) + RHO * eye()

    def best_pretrain(v: Values) -> Tensor:
        s = torch.sigmoid(v["reweight"])
        return torch.linalg.solve(xp.T @ (s[:, None] * xp) / n + MU * eye(), xp.T @ (s * yp) / n)

    return Reference(
        order=("reweight", "pretrain", "finetune"),
        reads={
            "reweight": ("pretrain", "finetune"),
            "pretrain": ("pretrain", "reweight"),
            "finetune": ("finetune", "pretrain"),
        },
        losses={
            "pretrain": lambda v, b: (
                0.5 * (torch.sigmoid(v["reweight"]) * (b[0] @ v["pretrain"] - b[1]) ** 2).mean()
                + 0.5 * MU * (v["pretrain"] ** 2).sum()
            ),
            "finetune": lambda v, b: (
                fit(v["finetune"], *b) + 0.5 * RHO * ((v["finetune"] - v["pretrain"]) ** 2).sum()
            ),
            "reweight": lambda v, b: fit(v["pretrain"], b[0], b[1]) + fit(v["finetune"], b[2], b[3]),
        },
        batches={"pretrain": (xp, yp), "finetune": (xf, yf), "reweight": (xv1, yv1, xv2, yv2)},
        free={"reweight": torch.linspace(-1.0, 1.0, n, dtype=DTYPE)},
        best={
            "pretrain": best_pretrain,
            "finetune": lambda v: torch.linalg.solve(h_f, moment(xf, yf) + RHO * v["pretrain"]),
        },
        tested=("reweight",),
    )


IGNORING_EDGES = {
    "u2l": {"reweight": ["pretrain"]},
    "l2u": {"pretrain": ["finetune", "reweight"], "finetune": ["reweight"]},
}


def learning_by_ignoring(
    methods: Mapping[str, str], *, finetune_offset: float = 0.0, nested: str | None = None, **config: Any
) -> NestedCase:
    """Case c, see :func:`ignoring_reference`, on Betty's graph verbatim. Tested: ``reweight``.

    With ``finetune_offset`` finetune starts that far (on every coordinate) from its solution and the
    case tests ``finetune`` instead: pretrain's solution does not depend on finetune, so its exact
    hypergradient is its plain gradient there (nonzero).
    """
    ref = ignoring_reference()
    start = None
    if finetune_offset:
        ref.tested = ("finetune",)
        start = {"finetune": ref.solution()["finetune"] + finetune_offset}
    return build(ref, IGNORING_EDGES, methods, nested=nested, start=start, **config)


# --------------------------------------------------------------------------- d. captioning (NAS) shape
def captioning_reference() -> Reference:
    """Betty's NAS-for-captioning shape: outer(lam) over inner1(w1) and inner2(w2).

    * inner1: ``fit(w1; X1) + 0.5 sum(exp(lam) w1^2)`` -> ``w1* = (S1 + diag(exp(lam)))^-1 r1``.
    * inner2: ``fit(w2; X2) + 0.5 sum(exp(lam) (w2 - w1)^2)`` (outer's parameters AND inner1's solution)
      -> ``w2* = (S2 + diag(exp(lam)))^-1 (r2 + exp(lam) * w1)``.
    * outer:  ``fit(w1; Xv1) + fit(w2; Xv2)``: lam reaches it through w1*, w2* directly and w2* via w1*.
    """
    (x1, y1), (x2, y2), (xv1, yv1), (xv2, yv2) = (regression_data(30, D, seed=s) for s in (50, 51, 52, 53))

    def best_inner1(v: Values) -> Tensor:
        return torch.linalg.solve(gram(x1) + torch.diag(torch.exp(v["outer"])), moment(x1, y1))

    def best_inner2(v: Values) -> Tensor:
        e = torch.exp(v["outer"])
        return torch.linalg.solve(gram(x2) + torch.diag(e), moment(x2, y2) + e * v["inner1"])

    return Reference(
        order=("outer", "inner1", "inner2"),
        reads={
            "outer": ("inner1", "inner2"),
            "inner1": ("inner1", "outer"),
            "inner2": ("inner2", "inner1", "outer"),
        },
        losses={
            "inner1": lambda v, b: (
                fit(v["inner1"], *b) + 0.5 * (torch.exp(v["outer"]) * v["inner1"] ** 2).sum()
            ),
            "inner2": lambda v, b: (
                fit(v["inner2"], *b) + 0.5 * (torch.exp(v["outer"]) * (v["inner2"] - v["inner1"]) ** 2).sum()
            ),
            "outer": lambda v, b: fit(v["inner1"], b[0], b[1]) + fit(v["inner2"], b[2], b[3]),
        },
        batches={"inner1": (x1, y1), "inner2": (x2, y2), "outer": (xv1, yv1, xv2, yv2)},
        free={"outer": torch.tensor([-0.4, 0.2, 0.5], dtype=DTYPE)},
        best={"inner1": best_inner1, "inner2": best_inner2},
        tested=("outer",),
    )


CAPTIONING_EDGES = {
    "l2u": {"inner1": ["inner2", "outer"], "inner2": ["outer"]},
    "u2l": {"outer": ["inner2", "inner1"]},
}


def captioning(methods: Mapping[str, str], *, nested: str | None = None, **config: Any) -> NestedCase:
    """Case d, see :func:`captioning_reference`, on Betty's graph verbatim. Tested: ``outer``."""
    return build(captioning_reference(), CAPTIONING_EDGES, methods, nested=nested, **config)


# --------------------------------------------------------------------------- e. two uppers, one shared lower
KAPPA = 0.1  # upper2's own direct penalty


def shared_lower_reference() -> Reference:
    """upper1(lam1) and upper2(m2) over one lower(w) (an ``nn.Linear``).

    * lower:  ``fit(w; X) + 0.5 sum(exp(lam1) w^2) + RHO/2 |w - m2|^2``
      -> ``w* = (S + diag(exp(lam1)) + RHO I)^-1 (r + RHO m2)``.
    * upper1: ``fit(w; Xv1)``; upper2: ``fit(w; Xv2) + KAPPA/2 |m2|^2`` (a direct term besides the one through w*).
    """
    (x, y), (xv1, yv1), (xv2, yv2) = (regression_data(30, D, seed=s) for s in (60, 61, 62))

    def best_lower(v: Values) -> Tensor:
        h = gram(x) + torch.diag(torch.exp(v["upper1"])) + RHO * eye()
        return torch.linalg.solve(h, moment(x, y) + RHO * v["upper2"])

    return Reference(
        order=("upper1", "upper2", "lower"),
        reads={"upper1": ("lower",), "upper2": ("lower", "upper2"), "lower": ("lower", "upper1", "upper2")},
        losses={
            "lower": lambda v, b: (
                fit(v["lower"], *b)
                + 0.5 * (torch.exp(v["upper1"]) * v["lower"] ** 2).sum()
                + 0.5 * RHO * ((v["lower"] - v["upper2"]) ** 2).sum()
            ),
            "upper1": lambda v, b: fit(v["lower"], *b),
            "upper2": lambda v, b: fit(v["lower"], *b) + 0.5 * KAPPA * (v["upper2"] ** 2).sum(),
        },
        batches={"lower": (x, y), "upper1": (xv1, yv1), "upper2": (xv2, yv2)},
        free={
            "upper1": torch.tensor([0.3, -0.5, 0.1], dtype=DTYPE),
            "upper2": torch.tensor([0.5, 1.0, -0.7], dtype=DTYPE),
        },
        best={"lower": best_lower},
        tested=("upper1", "upper2"),
        linear=frozenset({"lower"}),
    )


SHARED_LOWER_EDGES = {
    "u2l": {"upper1": ["lower"], "upper2": ["lower"]},
    "l2u": {"lower": ["upper1", "upper2"]},
}


def diamond_shared_lower(
    methods: Mapping[str, str], *, nested: str | None = None, **config: Any
) -> NestedCase:
    """Case e, see :func:`shared_lower_reference`. Tested: both uppers, each w.r.t. its own parameter."""
    return build(shared_lower_reference(), SHARED_LOWER_EDGES, methods, nested=nested, **config)


# --------------------------------------------------------------------------- f. one upper, two lowers
def two_lowers_reference() -> Reference:
    """upper(lam) over lower1(w1) and lower2(w2) (both ``nn.Linear``).

    * lower1: ``fit(w1; X1) + 0.5 sum(exp(lam) w1^2)`` -> ``w1* = (S1 + diag(exp(lam)))^-1 r1``.
    * lower2: ``fit(w2; X2) + RHO/2 |w2 - lam|^2`` -> ``w2* = (S2 + RHO I)^-1 (r2 + RHO lam)``.
    * upper:  ``0.5 mean((Xv (w1 + w2) / 2 - yv)^2)``: reads both lowers, coupled.
    """
    (x1, y1), (x2, y2), (xv, yv) = (regression_data(30, D, seed=s) for s in (70, 71, 72))
    return Reference(
        order=("upper", "lower1", "lower2"),
        reads={"upper": ("lower1", "lower2"), "lower1": ("lower1", "upper"), "lower2": ("lower2", "upper")},
        losses={
            "lower1": lambda v, b: (
                fit(v["lower1"], *b) + 0.5 * (torch.exp(v["upper"]) * v["lower1"] ** 2).sum()
            ),
            "lower2": lambda v, b: fit(v["lower2"], *b) + 0.5 * RHO * ((v["lower2"] - v["upper"]) ** 2).sum(),
            "upper": lambda v, b: fit(0.5 * (v["lower1"] + v["lower2"]), *b),
        },
        batches={"lower1": (x1, y1), "lower2": (x2, y2), "upper": (xv, yv)},
        free={"upper": torch.tensor([0.4, -0.3, 0.0], dtype=DTYPE)},
        best={
            "lower1": lambda v: torch.linalg.solve(
                gram(x1) + torch.diag(torch.exp(v["upper"])), moment(x1, y1)
            ),
            "lower2": lambda v: torch.linalg.solve(gram(x2) + RHO * eye(), moment(x2, y2) + RHO * v["upper"]),
        },
        tested=("upper",),
        linear=frozenset({"lower1", "lower2"}),
    )


TWO_LOWERS_EDGES = {"u2l": {"upper": ["lower1", "lower2"]}, "l2u": {"lower1": ["upper"], "lower2": ["upper"]}}


def diamond_two_lowers(methods: Mapping[str, str], *, nested: str | None = None, **config: Any) -> NestedCase:
    """Case f, see :func:`two_lowers_reference`. Tested: ``upper``."""
    return build(two_lowers_reference(), TWO_LOWERS_EDGES, methods, nested=nested, **config)


REFERENCES: dict[str, Callable[[], Reference]] = {
    "three_level_chain": chain_reference,
    "four_level_chain": four_chain_reference,
    "learning_by_ignoring": ignoring_reference,
    "captioning": captioning_reference,
    "diamond_shared_lower": shared_lower_reference,
    "diamond_two_lowers": two_lowers_reference,
}
CASES: dict[str, Callable[..., NestedCase]] = {
    "three_level_chain": three_level_chain,
    "four_level_chain": four_level_chain,
    "learning_by_ignoring": learning_by_ignoring,
    "captioning": captioning,
    "diamond_shared_lower": diamond_shared_lower,
    "diamond_two_lowers": diamond_two_lowers,
}
