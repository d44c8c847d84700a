"""Exact total-derivative hypergradients on deeper graphs, against float64 closed forms.

The closed forms (:mod:`betty_like.testing.nested`) are nested best responses written with
``torch.linalg.solve``; their hypergradients are plain ``torch.autograd.grad`` through them. The
``reference`` tests below check those references on their own, with no engine: central finite
differences of the same closed forms, and stationarity of every best response (at the solution and
at a perturbed point) for the very losses the engine's problems evaluate. The remaining tests run
the engine from the exact nested solution and compare each upper problem's hypergradient.

A middle problem's exact hypergradient is zero at the solution; its errors are measured against
the norm of its plain gradient (what an engine ignoring the paths through lower solutions returns).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from betty_like.testing.nested import (
    CASES,
    REFERENCES,
    Reference,
    four_level_chain,
    learning_by_ignoring,
    three_level_chain,
)

EXACT = ("neumann", "cg", "fixed_point")
TOL = 1e-6


def hypergradient(engine, name):
    """The hypergradient ``name`` last stepped on, keyed ``"<problem>.<param>"``: the one place that reads it.

    ``engine.status(name).gradient`` is the public status API; until it lands, the engine's older
    ``last_gradient`` gives the same dict.
    """
    status = getattr(engine, "status", None)
    if status is None:
        return engine.status(name).gradient
    return status(name).gradient


# --------------------------------------------------------------------------- the references on their own
def _scale(ref: Reference, name: str, at=None) -> float:
    return max(float(ref.hypergradient(name, at).norm()), float(ref.direct_gradient(name, at).norm()))


def _central_difference(fn, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    g = torch.zeros_like(x)
    for k in range(x.numel()):
        step = torch.zeros_like(x)
        step.view(-1)[k] = eps
        g.view(-1)[k] = (fn(x + step) - fn(x - step)) / (2 * eps)
    return g


@pytest.mark.parametrize("case", sorted(REFERENCES))
def test_reference_matches_finite_differences(case):
    ref = REFERENCES[case]()
    solution = ref.solution()
    for name in ref.tested:
        exact = ref.hypergradient(name)
        with torch.no_grad():
            fd = _central_difference(lambda x, name=name: ref.reduced(name, x), solution[name])
        error = float((fd - exact).norm()) / _scale(ref, name)
        assert error < TOL, f"{case}/{name}: closed form vs finite differences, relative error {error:.2e}"
        if ref.partial and name in ref.free:
            partial = ref.hypergradient(name, partial=True)
            with torch.no_grad():
                fd = _central_difference(
                    lambda x, name=name: ref.reduced(name, x, partial=True), solution[name]
                )
            error = float((fd - partial).norm()) / float(partial.norm())
            assert error < TOL, (
                f"{case}/{name}: partial closed form vs finite differences, relative error {error:.2e}"
            )


@pytest.mark.parametrize("case", sorted(REFERENCES))
def test_reference_best_responses_are_stationary(case):
    """Each closed-form best response zeroes the total gradient of its problem's own loss (lower best
    responses substituted), at the solution and after perturbing every value above it."""
    ref = REFERENCES[case]()
    solution = ref.solution()
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(ref.order):
        if name in ref.free:
            continue
        above = {
            n: solution[n] + 0.3 * torch.randn(solution[n].shape, generator=g, dtype=solution[n].dtype)
            for n in ref.order[:i]
        }
        with torch.no_grad():
            perturbed = ref.solve(above)
        for at, where in ((solution, "solution"), (perturbed, "perturbed point")):
            residual = float(ref.hypergradient(name, at).norm())
            size = float(ref.direct_gradient(name, at).norm()) + float(at[name].norm())
            assert residual < 1e-10 * size, (
                f"{case}/{name} at the {where}: total gradient {residual:.2e} is not zero"
            )


@pytest.mark.parametrize("case", ["three_level_chain", "four_level_chain"])
def test_reference_partial_rule_is_betty_and_differs_from_total(case):
    """Betty's rule: the tilted response is stationary for the middle loss with lower solutions frozen,
    passes through the solution, and gives a hypergradient more than 1% away from the total one."""
    ref = REFERENCES[case]()
    solution = ref.solution()
    (top,) = ref.free
    for mid, response in ref.partial.items():
        g0 = ref.direct_gradient(mid)
        assert torch.allclose(response(solution, solution), solution[mid], rtol=1e-12, atol=1e-14)
        moved = {**solution, top: solution[top] + torch.tensor([0.3, -0.2, 0.5], dtype=solution[top].dtype)}
        w = response(moved, solution).requires_grad_(True)
        (grad,) = torch.autograd.grad(ref.loss(mid, {**moved, mid: w}), w)
        assert torch.allclose(grad, g0, rtol=1e-10, atol=1e-12), (
            f"{case}/{mid}: tilted response is not stationary"
        )
    total, partial = ref.hypergradient(top), ref.hypergradient(top, partial=True)
    gap = float((total - partial).norm() / total.norm())
    print(f"{case}: total vs partial hypergradient of {top!r} differ by {gap:.1%}")
    assert gap > 0.01, f"{case}: total and partial rules differ by only {gap:.2%}"


# --------------------------------------------------------------------------- the engine against them
def _error(case, name: str, expected=None) -> float:
    expected = case.exact[name] if expected is None else expected[name]
    got = hypergradient(case.engine, name)
    assert got is not None, f"{name!r} recorded no hypergradient"
    assert set(got) == set(expected), f"{name!r}: gradient keys {sorted(got)}, expected {sorted(expected)}"
    for key in got:
        assert torch.isfinite(got[key]).all(), f"{key}: non-finite hypergradient {got[key]}"
    squared = sum(float(((got[k].detach().to(expected[k].dtype) - expected[k]) ** 2).sum()) for k in expected)
    return squared**0.5 / case.scale[name]


def _assert_exact(case, label: str, expected=None) -> None:
    errors = {name: _error(case, name, expected) for name in (expected or case.exact)}
    bad = {n: e for n, e in errors.items() if not e < TOL}
    summary = ", ".join(f"{n}: {e:.2e}" for n, e in errors.items())
    assert not bad, f"{label}: relative errors {summary} (tolerance {TOL:g})"


def _product(*names: str) -> list[dict[str, str]]:
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(EXACT, repeat=len(names))]


MIXED_FOUR = [{"low": m, "lower_mid": m, "upper_mid": m} for m in EXACT] + [
    {"low": "cg", "lower_mid": "neumann", "upper_mid": "fixed_point"},
    {"low": "fixed_point", "lower_mid": "cg", "upper_mid": "neumann"},
    {"low": "neumann", "lower_mid": "fixed_point", "upper_mid": "cg"},
]
EXACT_CASES = (
    [("three_level_chain", m) for m in _product("low", "mid")]
    + [("four_level_chain", m) for m in MIXED_FOUR]
    + [("learning_by_ignoring", m) for m in _product("pretrain", "finetune")]
    + [("captioning", m) for m in _product("inner1", "inner2")]
    + [("diamond_shared_lower", {"lower": m}) for m in EXACT]
    + [("diamond_two_lowers", m) for m in _product("lower1", "lower2")]
)


def _id(item) -> str:
    return "-".join(f"{k}={v}" for k, v in item.items()) if isinstance(item, dict) else str(item)


@pytest.mark.parametrize(("case", "methods"), EXACT_CASES, ids=[f"{c}[{_id(m)}]" for c, m in EXACT_CASES])
def test_exact_methods_at_every_level(case, methods):
    built = CASES[case](methods)
    built.engine.run()
    _assert_exact(built, f"{case} with {methods}")


@pytest.mark.parametrize("methods", [{"pretrain": "cg", "finetune": m} for m in EXACT], ids=_id)
def test_learning_by_ignoring_finetune_gets_its_plain_gradient(methods):
    """Off its solution, finetune's hypergradient is its plain gradient: nothing below depends on it."""
    case = learning_by_ignoring(methods, finetune_offset=0.5)
    assert case.scale["finetune"] > 0.1
    case.engine.run()
    _assert_exact(case, f"learning_by_ignoring (finetune displaced) with {methods}")


def test_unroll_on_a_middle_level_converges_to_the_exact_hypergradient():
    case = three_level_chain({"low": "cg", "mid": "unroll"})
    steps = case.problems["mid"].config.unroll_steps
    assert case.contraction["mid"] ** steps < 1e-8
    case.engine.run()
    errors = {"top": _error(case, "top")}
    assert errors["top"] < TOL, (
        f"unroll on mid ({steps} steps) with cg below: relative error {errors['top']:.2e}"
    )


def test_first_order_on_a_middle_level_is_finite_and_not_exact():
    case = three_level_chain({"low": "cg", "mid": "first_order"})
    case.engine.run()
    error = _error(case, "top")  # also checks the result is finite
    assert error > 1e-3, (
        f"first_order on mid matches the exact hypergradient ({error:.2e}): it drops second-order terms"
    )


def test_unroll_on_a_shared_lower_serves_both_uppers():
    case = CASES["diamond_shared_lower"]({"lower": "unroll"})
    assert case.contraction["lower"] ** case.problems["lower"].config.unroll_steps < 1e-8
    case.engine.run()
    _assert_exact(case, "unroll on the lower shared by upper1 and upper2")


@pytest.mark.parametrize(
    "methods",
    [
        {"low": "cg", "mid": "cg"},
        {"low": "cg", "mid": "neumann"},
        {"low": "fixed_point", "mid": "fixed_point"},
    ],
    ids=_id,
)
@pytest.mark.parametrize("nested", ["total", "partial"])
def test_nested_option_on_the_middle_level(methods, nested):
    """``nested="partial"`` reproduces Betty's rule for the top; mid's own hypergradient stays exact (zero)."""
    case = three_level_chain(methods, nested=nested)
    gap = (
        sum(float(((case.exact["top"][k] - case.partial["top"][k]) ** 2).sum()) for k in case.exact["top"])
        ** 0.5
    )
    assert gap / case.scale["top"] > 0.01
    case.engine.run()
    expected = {
        "top": case.exact["top"] if nested == "total" else case.partial["top"],
        "mid": case.exact["mid"],
    }
    _assert_exact(case, f"three_level_chain nested={nested!r} with {methods}", expected)


@pytest.mark.parametrize(
    "methods",
    [
        {"low": "cg", "lower_mid": "cg", "upper_mid": "cg"},
        {"low": "neumann", "lower_mid": "cg", "upper_mid": "fixed_point"},
    ],
    ids=_id,
)
def test_partial_rule_on_the_upper_middle_of_four_levels(methods):
    """Betty's rule at upper_mid only: the top gets the partial closed form, both middles stay exact (zero)."""
    case = four_level_chain(methods, configs={"upper_mid": {"nested": "partial"}})
    case.engine.run()
    expected = {
        "top": case.partial["top"],
        "upper_mid": case.exact["upper_mid"],
        "lower_mid": case.exact["lower_mid"],
    }
    _assert_exact(case, f"four_level_chain, partial rule on upper_mid, with {methods}", expected)
