"""Hessian-vector products of a lower problem's loss captured with ``torch.compile`` (``compile_hypergrad``).

An implicit hypergradient (``cg``, ``neumann``, ``fixed_point``) spends its time in Hessian-vector
products. Eagerly they are vector-Jacobian products on a gradient graph kept with ``create_graph``
(reverse over reverse): every product replays the graph operator by operator through Python and the
dispatcher. Here the product is a pure function ``(w, u, others, batch) -> H_ww u`` in
forward-over-reverse form, ``torch.func.jvp`` of ``torch.func.grad`` of the problem's
``training_step`` run with substituted parameters, captured whole (``fullgraph=True``) once per
shape of its inputs, like the captured plain steps (:mod:`.compiled`). ``aot_autograd`` refuses a
double backward but captures forward-over-reverse (torch 2.13).

Where the compiled product is used, and where not (each fallback is logged once):

- only inside a solver's iterations, whose products are never differentiated. The products that
  must carry a graph (a solve differentiated again, a push at three or more levels) stay eager, so
  nested hypergradients remain exact to every order;
- not for a problem whose own loss reads lower solutions under ``nested="total"`` (its objective
  contains best responses, autograd operations that cannot be captured);
- not while a dropout module is in training mode: each compiled product runs the forward again and
  would draw new masks, whereas the eager products share one graph and one mask;
- not under autocast (``hvp_precision="autocast"``), nor for batch shapes beyond :data:`MAX_SHAPES`;
- not when the model cannot be captured (``.item()``, Python branches on tensor values, ...): then its
  products run eager, with one log line naming the problem and the reason.

``cg`` goes further: :meth:`CompiledHVP.at` also offers ``repeat``, the iterations between two
residual checks (a solver's pure step, products and solver arithmetic together) captured as one graph
per block length, damping and shape, so that neither dynamo's call overhead nor the eager vector
arithmetic is paid per product. On the digits MLP of ``benchmarks/compiled_hypergrad.py`` blocks of 10
made the hypergradient 2.6-3.1x faster than eager (two runs), blocks of one iteration 1.55-2.0x.

``compile_hypergrad="auto"`` times a compiled and an eager product once per shape and keeps the faster.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp

from .._functional import ProblemModules, call_with
from ..hypergrad._linsolve import Step, iterate
from ..optim import Params
from ._compiled_step import compile_options, own_code
from .compiled import MAX_SHAPES, batch_shape

log = logging.getLogger("betty_like")

MatVec = Callable[[Params], Params]


@dataclass(frozen=True)
class CompiledProducts:
    """One solve's compiled products: ``H u`` one at a time, and solver blocks with them fused in.

    ``repeat(step, state, n, damping)`` runs ``n`` iterations of a solver's pure ``step(matvec, state)``
    on ``matvec(u) = H u + damping * u``, captured as one graph per ``(step, n, damping)`` and input
    shape: the solver's own arithmetic and the Python around each product leave the iteration.
    """

    product: MatVec
    repeat: Callable[[Step, Any, int, float], tuple[Any, Tensor]]

    def __call__(self, u: Params) -> Params:
        """``H u``."""
        return self.product(u)


_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# Blocks on CUDA are compiled without CUDA graphs, whose replays reuse their output buffers: the
# state a block returns is its next call's input (not measured here: no GPU).
_BLOCK_OPTIONS: dict[str, dict[str, Any]] = {"cuda": {"fullgraph": True, "dynamic": False}}
_TIMED = 3  # products of each kind timed by compile_hypergrad="auto"


class CompiledHVP:
    """The compiled Hessian-vector products of one problem's loss, one captured graph per input shape.

    Args:
        owner: the problem's name.
        mode: ``True`` or ``"auto"`` (its ``compile_hypergrad``).
        training_step: the problem's loss function of a batch.
        modules: every problem's module, so that ``training_step`` runs with substituted parameters.
        batch_of: the problem's current batch and its data-parallel share, read when a solve starts.
        warn_once: the engine's once-per-message warning.
    """

    def __init__(
        self,
        owner: str,
        mode: bool | str,
        training_step: Callable[[Any], Tensor],
        modules: ProblemModules,
        batch_of: Callable[[], tuple[Any, float]],
        warn_once: Callable[[str, str], None],
    ) -> None:
        self.choices: dict[tuple, str] = {}  # input shape -> "compiled" or "eager"
        self.owner, self.mode, self.modules = owner, mode, modules
        self.batch_of, self.warn_once = batch_of, warn_once

        def loss(w: Params, others: Params, batch: Any, share: float) -> Tensor:
            return call_with(modules, {**others, **w}, training_step, batch).reshape(()) * share

        def product(w: Params, u: Params, others: Params, batch: Any, share: float) -> Params:
            return jvp(grad(lambda p: loss(p, others, batch, share)), (w,), (u,))[1]

        self._loss = loss
        self._product = product
        self._compiled: Callable[..., Params] | None = None  # compiled at the first solve, for its device
        self._blocks: dict[tuple, Callable[..., Any] | None] = {}  # (step, n, damping, shape) -> captured block

    def at(self, w: Params, others: Params) -> CompiledProducts | None:
        """``u -> H_ww u`` at ``(w, others)`` on the current batch, compiled; ``None``: use eager products."""
        reason = self._refusal()
        if reason is not None:
            self.warn_once(f"hvp:{self.owner}:{reason}", f"problem {self.owner!r}: compile_hypergrad: {reason}; its solves use eager products")
            return None
        batch, share = self.batch_of()
        w = {k: t.detach() for k, t in w.items()}
        others = {k: t.detach() for k, t in others.items() if k not in w}
        device = next(iter(w.values())).device.type
        if self._compiled is None:
            self._compiled = torch.compile(own_code(self._product), **compile_options(device))
        compiled = self._compiled
        cuda = device == "cuda"

        def run(u: Params) -> Params:
            with torch.no_grad():  # nothing here is differentiated: no backward graph for aot_autograd to build
                if cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                out = compiled(w, {k: u[k].detach() for k in w}, others, batch, share)
            return {k: t.clone() for k, t in out.items()} if cuda else out  # a CUDA graph replay reuses its outputs

        key = batch_shape((batch, w, others))
        choice = self.choices.get(key) or self._choose(key, run, w, others, batch, share)
        if choice != "compiled":
            return None

        def repeat(step: Step, state: Any, n: int, damping: float) -> tuple[Any, Tensor]:
            block = self._block(step, n, damping, device, key, (w, others, batch, share, state))
            if block is None:  # the block could not be captured: the same iterations on compiled products
                return iterate(lambda u: _damped(run(u), u, damping), step, state, n)
            with torch.no_grad():
                return block(w, others, batch, share, state)

        return CompiledProducts(run, repeat)

    def _block(
        self, step: Step, n: int, damping: float, device: str, key: tuple, example: tuple
    ) -> Callable[..., Any] | None:
        """``n`` iterations of ``step`` on damped products captured as one graph, once per shape (``None``: it
        could not be; logged once, and the iterations then run eagerly around compiled products)."""
        cached = (step, n, damping, key)
        if cached not in self._blocks:
            product = self._product

            def block(w: Params, others: Params, batch: Any, share: float, state: Any) -> tuple[Any, Tensor]:
                return iterate(lambda u: _damped(product(w, u, others, batch, share), u, damping), step, state, n)

            compiled = torch.compile(own_code(block), **_BLOCK_OPTIONS.get(device, compile_options(device)))
            try:
                with torch.no_grad():
                    compiled(*example)  # compiles; its result is discarded
                self._blocks[cached] = compiled
            except Exception as error:  # any failure to capture: dynamo, the backend compiler
                self.warn_once(
                    f"hvp-block:{self.owner}",
                    f"problem {self.owner!r}: compile_hypergrad could not capture {n} solver iterations as one graph "
                    f"({_first_line(error)}); they run one compiled product at a time",
                )
                self._blocks[cached] = None
        return self._blocks[cached]

    def _refusal(self) -> str | None:
        """Why products cannot be compiled now (``None``: they can)."""
        if torch.is_autocast_enabled():
            return "autocast is on (hvp_precision='autocast'), which the captured products do not follow"
        if any(isinstance(m, _DROPOUT) and m.training and m.p > 0 for m in self.modules.modules()):
            return "a dropout module is in training mode (every compiled product would draw new masks)"
        return None

    def _choose(self, key: tuple, run: MatVec, w: Params, others: Params, batch: Any, share: float) -> str:
        if len(self.choices) >= MAX_SHAPES:
            self.warn_once(
                f"hvp-shapes:{self.owner}",
                f"problem {self.owner!r}: compile_hypergrad captures {MAX_SHAPES} input shapes; further shapes use "
                "eager products. Keep batch shapes fixed (e.g. drop_last=True) to avoid this.",
            )
            self.choices[key] = "eager"
            return "eager"
        probe = {k: t.clone() for k, t in w.items()}
        try:
            start = time.perf_counter()
            run(probe)  # compiles
            compile_s = time.perf_counter() - start
        except Exception as error:  # any failure to capture: dynamo, the backend compiler
            self.warn_once(
                f"hvp-capture:{self.owner}",
                f"problem {self.owner!r}: compile_hypergrad could not capture its Hessian-vector product "
                f"({_first_line(error)}); its solves use eager products",
            )
            self.choices[key] = "eager"
            return "eager"
        self.choices[key] = "compiled" if self.mode is True else self._timed_choice(run, probe, w, others, batch, share, compile_s)
        return self.choices[key]

    def _timed_choice(
        self, run: MatVec, probe: Params, w: Params, others: Params, batch: Any, share: float, compile_s: float
    ) -> str:
        """``auto``: the faster of a compiled product and an eager one (on the gradient graph a solve keeps)."""
        with torch.enable_grad():
            live = {k: t.clone().requires_grad_(True) for k, t in w.items()}
            keys = list(live)
            gradient = torch.autograd.grad(self._loss(live, others, batch, share), [live[k] for k in keys], create_graph=True)

            def eager(u: Params) -> object:
                return torch.autograd.grad(gradient, [live[k] for k in keys], [u[k] for k in keys], retain_graph=True)

            eager_ms, compiled_ms = _median_ms(eager, probe), _median_ms(run, probe)
        choice = "compiled" if compiled_ms < eager_ms else "eager"
        log.info(
            "problem %r: compile_hypergrad='auto' chose %s products (eager %.3f ms, compiled %.3f ms per product; "
            "compile %.1f s)", self.owner, choice, eager_ms, compiled_ms, compile_s,
        )
        return choice


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _damped(product: Params, u: Params, damping: float) -> Params:
    """``H u + damping * u`` with the arithmetic of the eager solves (``_implicit._damped``)."""
    return product if damping == 0.0 else {k: product[k] + damping * u[k] for k in product}


def _median_ms(fn: Callable[[Params], object], u: Params) -> float:
    fn(u)  # warm-up
    times = []
    for _ in range(_TIMED):
        start = time.perf_counter()
        fn(u)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def plan_hvps(
    setups: Mapping[str, Any],
    modules: ProblemModules,
    batch_of: Callable[[str], Any],
    warn_once: Callable[[str, str], None],
) -> dict[str, CompiledHVP]:
    """A :class:`CompiledHVP` for every problem whose config sets ``compile_hypergrad`` and whose method pushes.

    ``setups`` are the engine's per-problem set-ups; ``batch_of(name)`` is the problem's current batch.
    """
    hvps = {}
    for name, setup in setups.items():
        mode = setup.config.compile_hypergrad
        if mode is False or setup.method.push is None:
            continue
        stream = setup.stream
        hvps[name] = CompiledHVP(
            name, mode, setup.problem.training_step, modules, lambda n=name, s=stream: (batch_of(n), s.share), warn_once
        )
    return hvps
