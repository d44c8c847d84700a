"""Configuration dataclasses for problems and the engine, validated on creation.

Defaults favour correct hypergradients over cheap ones: implicit solvers run to a tight tolerance
unless told otherwise. Every field is checked in ``__post_init__`` so a typo fails at construction,
not a thousand steps into training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .backends.registry import Policy, check_config_policy
from .hypergrad import METHODS

NESTED_RULES = ("total", "partial")
UNROLL_MEMORY = ("graph", "remat", "mixed")
DARTS_SCALES = ("lr", "identity")
NONFINITE_POLICIES = ("raise", "skip")
SOLVER_FAILURE_POLICIES = ("raise", "warn", "ignore")
EXECUTIONS = ("eager", "compiled", "auto")
PRECISIONS = ("fp32", "bf16", "fp16")
HVP_PRECISIONS = ("fp32", "autocast")
CURVATURES = ("hessian", "gauss_newton")
INDEFINITE = ("minres", "fail")


def _require(condition: bool, owner: str, field: str, value: object, fix: str) -> None:
    if not condition:
        raise ValueError(f"{owner}.{field}={value!r} is invalid: {fix}")


def _positive_int(owner: str, field: str, value: object) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    _require(ok, owner, field, value, "use an integer >= 1")


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional_positive(owner: str, field: str, value: float | None) -> None:
    ok = value is None or (_finite_number(value) and value > 0)
    _require(ok, owner, field, value, "use a finite positive number or None")


@dataclass
class ProblemConfig:
    """How one problem steps and how hypergradients flow through it.

    Attributes:
        hypergrad: how an upper problem's gradient passes through *this* problem's solution:
            ``unroll`` (reverse mode through the differentiable optimizer steps), ``first_order``
            (unroll with the Hessian terms in this problem's own parameters dropped), ``darts``
            (finite differences, inverse Hessian replaced by the learning rate), ``neumann`` / ``cg`` (implicit
            differentiation, inverse-Hessian-vector product by a Neumann series / conjugate
            gradient), ``kfac`` (conjugate gradient preconditioned with KFAC factors of the Linear and
            Conv2d layers; needs ``Problem.output_loss``), ``fixed_point`` (implicit differentiation of
            the optimizer's update map) or ``sama`` (darts with the optimizer's adaptation: Adam's
            moments, the learning rate for SGD).
        unroll_steps: steps this problem takes before the problems that read its solution step.
        truncate: keep only the last ``truncate`` of the unrolled steps in the graph (``None`` = all).
        unroll_memory: what an unrolled step keeps for the backward pass: ``"graph"`` (its whole graph),
            ``"remat"`` (only its inputs; the step runs again in the backward pass, replaying its
            random numbers, and is differentiated by double backward: far less memory for one more
            forward and backward per step) or ``"mixed"`` (the same, with the step's second-order
            products in forward mode, MixFlow-MG; not for a problem whose gradient goes through lower
            problems, nor with BatchNorm in train mode). See :mod:`betty_like.hypergrad.unroll_memory`.
        unroll_checkpoint_every: with ``"remat"`` or ``"mixed"``, only every this-many-th unrolled step
            keeps its inputs; the others are recomputed from it in the backward pass (about
            ``K / c + c`` kept steps instead of ``K``, for one more forward per step). ``None``: every step.
        iterations: maximum iterations of the linear solver (neumann, cg, fixed_point, kfac); ``0`` is
            allowed for ``kfac`` only, and means pure KFAC (the preconditioner applied once).
        curvature: the matrix of the implicit methods' linear system (neumann, cg, fixed_point,
            kfac): ``"hessian"`` (exact, default) or ``"gauss_newton"`` (``J^T H_out J``, positive
            semi-definite for a convex output loss, so CG meets no negative curvature; approximate
            where the loss's gradient in the outputs is not zero). Needs ``Problem.output_loss``.
        indefinite: what an implicit solve does when its iteration shows the system cannot be solved
            that way: ``cg`` (and ``kfac``) meeting non-positive curvature, a ``neumann`` series (or the
            ``fixed_point`` iteration of an SGD update, whose system is the Hessian's) found diverging
            after a fresh curvature estimate. ``"minres"`` (default): solve the same symmetric system
            again with MINRES on the remaining budget, valid for an indefinite Hessian; the solver is
            reported ``"cg+minres"``, ``"neumann+minres"`` or ``"fixed_point+minres"`` and logged once.
            ``"fail"``: report the failure (``on_solver_failure``). ``fixed_point`` of an update that is
            not a scalar multiple of the gradient step (Adam, per-group learning rates) is no symmetric
            system and always fails.
        kfac_damping: ``λ`` of each Kronecker block's inverse ``(A ⊗ G + λ I)^-1`` in ``kfac``;
            ``None``: ``damping`` plus 1e-3 times the block's mean eigenvalue. Only the preconditioner
            changes, never the solve's answer (except at ``iterations=0``, pure KFAC).
        kfac_refresh: ``kfac`` recomputes its factors after this many solves (one per upper step in
            a bilevel program); stale factors slow the solve, never change its answer.
        alpha: Neumann step size; ``None`` uses ``1 / L``, ``L`` the Hessian's largest eigenvalue estimated by power iteration.
        tol: relative residual at which the solver stops; ``None`` picks a tolerance suited to the
            parameter dtype (1e-12 for float64, 1e-6 for float32, 1e-3 for half types).
        damping: ridge added to the Hessian (``H + damping * I``) for indefinite or singular losses.
        fd_epsilon: finite-difference scale for darts and sama: ``epsilon = fd_epsilon / ||v||``.
        darts_scale: what replaces the inverse Hessian in ``darts``: ``"lr"``, each parameter's own
            group learning rate (the DARTS paper's xi, default), or ``"identity"`` (Betty's ``darts``:
            a port of a Betty program needs this, or a 1/lr larger upper learning rate).
        nested: for a problem that both reads lower solutions and is read by upper ones, which
            stationarity condition its best response is differentiated with: ``"total"`` (the
            gradient of its loss through its lowers' best responses: exact, default) or
            ``"partial"`` (its lowers' solutions held fixed: Betty's rule, cheaper, approximate).
        step_every: this problem steps once every ``step_every`` rounds of its lower problems.
        warmup_steps: initial steps of this problem that do not count towards its upper problems.
        grad_clip: clip this problem's gradient to this global norm before stepping (``None`` = off).
        on_nonfinite: ``raise`` on a NaN/inf loss or hypergradient, or ``skip`` the step (counted in
            ``status(name).skipped``). A non-finite hypergradient skips the *upper* step it belongs to.
        on_solver_failure: what a failed linear solve in a hypergradient through *this* problem does
            (it diverged, met NaN/inf, or conjugate gradient met negative curvature without a valid
            continuation): ``raise`` (default) a ``FloatingPointError`` naming this problem, the method,
            the residuals and the fix; ``warn``: log it at every step where it happens and use the
            result; ``ignore``: use it silently (``status().diagnostics`` still shows it). A solve that
            used up its ``iterations`` is no failure: it is reported, and logged if its residual is above 1e-2.
        fixed_randomness: every evaluation of this problem's loss within one hypergradient starts
            from the same random state (the same dropout masks), so darts' two perturbed evaluations
            and the levels of a nested push see one function. Off by default: it changes what a
            hypergradient averages over. (BatchNorm statistics are never advanced by a hypergradient's
            extra evaluations, whatever this says.)
        backends: operator policies swapped into this problem's module when the engine is built, per
            op (:func:`betty_like.backends.registry.swap`), e.g. ``{"conv2d": "auto"}``: an algorithm
            name for every layer of the op, a list of names by layer order, a callable
            ``f(layer, input_shape)`` or ``"auto"`` (timed). Ops not named keep torch's own layers.
            Construction checks the op names and the policies' form without importing any backend;
            algorithm names are checked against the op's registry when the engine is built.
        execution: how this problem's plain (first-order) steps run: ``eager``; ``compiled``, with
            forward, backward and update captured once per batch shape and replayed
            (:mod:`betty_like.execution`); or ``auto``, which times both on the first steps
            and keeps the faster. Steps that take a hypergradient or keep a graph for one stay eager.
        compile_hypergrad: ``False`` (default), ``True`` or ``"auto"``: the Hessian-vector products
            that the solvers of ``cg``, ``neumann`` and ``fixed_point`` take of *this* problem's loss are
            captured with ``torch.compile`` in forward-over-reverse form, once per input shape
            (:mod:`betty_like.execution.hvp`); ``cg`` also captures the iterations between two residual
            checks (``solver_check_every``), products and CG arithmetic together, as one graph. ``"auto"``
            times a compiled and an eager product once per shape and keeps the faster. Products that carry
            a graph (a push differentiated again) and models that cannot be captured use eager products
            (the latter logged once).
        solver_check_every: how often a linear solver reads its residual and curvature on the host
            (each read is a device synchronisation on a GPU): every ``n`` iterations and at the end.
            ``None`` (default): every iteration when the vectors live on the CPU (a read costs nothing
            there), every 10 on other devices. Between checks an ended iteration (converged, or non-positive
            or non-finite curvature) leaves its answer unchanged on the device, so the answer, the residual
            history and the outcome are those of a check at every iteration; failures are found at the next check.
        hvp_precision: under ``EngineConfig(precision="bf16"|"fp16")``, the precision of what
            differentiates this problem's solution: ``"fp32"`` (its loss evaluated again without
            autocast for Hessian-vector products, finite differences and kept unrolled graphs:
            default) or ``"autocast"`` (the low-precision graph itself: cheaper, less accurate).
        accumulate_steps: split each of this problem's batches into this many micro-batches along dim 0
            (``tensor_split`` shards, as data parallel splits a global batch over ranks) and take its loss as
            the sum of the shards' losses, each scaled by its share ``n_shard / n_batch``: the arithmetic of
            ``accumulate_steps`` data-parallel ranks, in one process (every derivative of the loss, by any
            method, is a sum over shards of per-shard derivatives). ``1``: the whole batch at once. Captured
            steps, compiled Hessian-vector products, Gauss-Newton curvature and ``kfac`` take the whole batch,
            so they are refused with it. See ``docs/distributed.md``.
    """

    hypergrad: str = "unroll"
    unroll_steps: int = 1
    truncate: int | None = None
    iterations: int = 100
    alpha: float | None = None
    tol: float | None = None
    damping: float = 0.0
    fd_epsilon: float = 0.01
    darts_scale: str = "lr"
    nested: str = "total"
    unroll_memory: str = "graph"
    unroll_checkpoint_every: int | None = None
    step_every: int = 1
    warmup_steps: int = 0
    grad_clip: float | None = None
    on_nonfinite: str = "raise"
    backends: dict[str, Policy] = field(default_factory=dict)
    on_solver_failure: str = "raise"
    fixed_randomness: bool = False
    execution: str = "eager"
    hvp_precision: str = "fp32"
    compile_hypergrad: bool | str = False
    solver_check_every: int | None = None
    curvature: str = "hessian"
    indefinite: str = "minres"
    kfac_refresh: int = 1
    kfac_damping: float | None = None
    accumulate_steps: int = 1

    def __post_init__(self) -> None:
        owner = "ProblemConfig"
        _require(
            self.hypergrad in METHODS,
            owner,
            "hypergrad",
            self.hypergrad,
            f"choose one of {list(METHODS)}",
        )
        for name, choices in (
            ("nested", NESTED_RULES),
            ("darts_scale", DARTS_SCALES),
            ("unroll_memory", UNROLL_MEMORY),
            ("hvp_precision", HVP_PRECISIONS),
            ("curvature", CURVATURES),
            ("indefinite", INDEFINITE),
        ):
            value = getattr(self, name)
            _require(value in choices, owner, name, value, f"choose one of {list(choices)}")
        for name in ("unroll_steps", "step_every", "kfac_refresh"):
            _positive_int(owner, name, getattr(self, name))
        pure_kfac = self.hypergrad == "kfac" and self.iterations == 0
        _require(
            pure_kfac or (isinstance(self.iterations, int) and not isinstance(self.iterations, bool) and self.iterations >= 1),
            owner, "iterations", self.iterations, "use an integer >= 1 (0, pure KFAC, only with hypergrad='kfac')",
        )
        _require(
            self.curvature == "hessian" or METHODS[self.hypergrad].curvature,
            owner,
            "curvature",
            self.curvature,
            f"it applies to the implicit methods {[m for m in METHODS if METHODS[m].curvature]}, not to "
            f"hypergrad={self.hypergrad!r}: choose one of them or curvature='hessian'",
        )
        if self.truncate is not None:
            _positive_int(owner, "truncate", self.truncate)
        if self.unroll_checkpoint_every is not None:
            _positive_int(owner, "unroll_checkpoint_every", self.unroll_checkpoint_every)
            _require(
                self.unroll_memory != "graph", owner, "unroll_checkpoint_every", self.unroll_checkpoint_every,
                "it recomputes lean steps: set unroll_memory='remat' or 'mixed' too, or leave it None",
            )
        _require(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            owner,
            "warmup_steps",
            self.warmup_steps,
            "use an integer >= 0",
        )
        _optional_positive(owner, "alpha", self.alpha)
        _optional_positive(owner, "tol", self.tol)
        _optional_positive(owner, "grad_clip", self.grad_clip)
        _optional_positive(owner, "kfac_damping", self.kfac_damping)
        _require(
            _finite_number(self.fd_epsilon) and self.fd_epsilon > 0,
            owner,
            "fd_epsilon",
            self.fd_epsilon,
            "use a finite positive number",
        )
        _require(
            _finite_number(self.damping) and self.damping >= 0, owner, "damping", self.damping, "use a finite number >= 0"
        )
        _require(isinstance(self.fixed_randomness, bool), owner, "fixed_randomness", self.fixed_randomness, "use True or False")
        for name, choices in (("on_nonfinite", NONFINITE_POLICIES), ("on_solver_failure", SOLVER_FAILURE_POLICIES)):
            value = getattr(self, name)
            _require(value in choices, owner, name, value, f"choose one of {list(choices)}")
        _require(isinstance(self.backends, Mapping), owner, "backends", self.backends, 'use a dict op -> policy, e.g. {"conv2d": "auto"}')
        # plain containers, so a mapping or list from a config system (OmegaConf) behaves like a dict or list
        self.backends = {
            op: list(policy) if isinstance(policy, Sequence) and not isinstance(policy, str) else policy
            for op, policy in self.backends.items()
        }
        for op, policy in self.backends.items():
            try:
                check_config_policy(op, policy)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{owner}.backends[{op!r}]={policy!r} is invalid: {error}") from None
        _require(
            self.execution in EXECUTIONS,
            owner,
            "execution",
            self.execution,
            f"choose one of {list(EXECUTIONS)}",
        )
        _check_solver_options(owner, self)
        _check_accumulation(owner, self)


def _check_accumulation(owner: str, config: ProblemConfig) -> None:
    """``accumulate_steps``: an integer >= 1, and > 1 only with what evaluates the loss shard by shard."""
    _positive_int(owner, "accumulate_steps", config.accumulate_steps)
    if config.accumulate_steps == 1:
        return
    whole_batch = {
        "execution": (config.execution != "eager", "a captured step runs the whole batch; use execution='eager'"),
        "compile_hypergrad": (
            config.compile_hypergrad is not False,
            "compiled Hessian-vector products take the whole batch; use compile_hypergrad=False",
        ),
        "curvature": (
            config.curvature == "gauss_newton",
            "Gauss-Newton products split the whole batch's output_loss; use curvature='hessian'",
        ),
        "hypergrad": (
            config.hypergrad == "kfac",
            "kfac's factors and products read the whole batch's output_loss; use hypergrad='cg'",
        ),
    }
    for name, (refused, fix) in whole_batch.items():
        _require(
            not refused, owner, name, getattr(config, name),
            f"with accumulate_steps={config.accumulate_steps} {fix}, or accumulate_steps=1",
        )


def _check_solver_options(owner: str, config: ProblemConfig) -> None:
    """``compile_hypergrad`` and ``solver_check_every``."""
    mode = config.compile_hypergrad
    _require(mode is False or mode is True or mode == "auto", owner, "compile_hypergrad", mode, "use False, True or 'auto'")
    if config.solver_check_every is not None:
        _positive_int(owner, "solver_check_every", config.solver_check_every)


@dataclass
class EngineConfig:
    """How the engine runs the whole multilevel program.

    Attributes:
        train_iters: engine iterations; each iteration steps every leaf problem once.
        valid_every: call every problem's ``validation_step`` each this many iterations (0 = never).
        device: move every module and batch to this device (``None`` leaves placement to the user).
        seed: seed for torch's generators at the start of ``run`` (``None`` leaves them alone).
        log_every: record every problem's last loss in ``engine.history``, and write a row to the
            loggers, each this many iterations.
        logger: ``"none"`` (write nothing), ``"csv"``, ``"tensorboard"`` or both, ``"csv,tensorboard"``
            (:mod:`betty_like.logging`).
        log_dir: where the loggers write; required with a logger.
        progress: a tqdm bar on rank 0: ``None`` shows it on a terminal only, ``True`` always, ``False`` never.
        checkpoint_every: write a checkpoint each this many iterations (0 = never; :mod:`betty_like.checkpoint`).
        checkpoint_dir: where checkpoints go; required with ``checkpoint_every`` or ``resume="latest"``.
        keep_checkpoints: how many of the newest checkpoints to keep.
        resume: continue from a checkpoint file, or ``"latest"`` in ``checkpoint_dir`` (a fresh start
            if there is none yet), at the start of ``run``.
        precision: ``"fp32"``, or forwards under autocast in ``"bf16"`` / ``"fp16"``; parameters,
            gradients and hypergradient arithmetic stay fp32 (:mod:`betty_like.precision`).
        loss_scale: the initial loss scale under fp16 (halved on each overflow, doubled after 2000 good steps).
        distributed: data parallel over the initialised process group or torchrun's (``None``: on
            when ``WORLD_SIZE`` > 1 or a process group exists); see :mod:`betty_like.distributed`.
    """

    train_iters: int = 1000
    valid_every: int = 0
    device: str | None = None
    seed: int | None = None
    log_every: int = 10
    logger: str = "none"
    log_dir: str | None = None
    progress: bool | None = None
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 3
    resume: str | None = None
    precision: str = "fp32"
    loss_scale: float = 2.0**16
    distributed: bool | None = None

    def loggers(self) -> list[str]:
        """The logger kinds named by ``logger``, in order (empty for ``"none"``)."""
        return [] if self.logger == "none" else [k.strip() for k in self.logger.split(",")]

    def __post_init__(self) -> None:
        owner = "EngineConfig"
        _require(self.precision in PRECISIONS, owner, "precision", self.precision, f"choose one of {list(PRECISIONS)}")
        _require(
            isinstance(self.loss_scale, (int, float)) and 0 < self.loss_scale < float("inf"),
            owner,
            "loss_scale",
            self.loss_scale,
            "use a finite number > 0",
        )
        _positive_int(owner, "train_iters", self.train_iters)
        _positive_int(owner, "log_every", self.log_every)
        _require(
            isinstance(self.valid_every, int) and self.valid_every >= 0,
            owner,
            "valid_every",
            self.valid_every,
            "use an integer >= 0 (0 disables validation)",
        )
        from .logging import LOGGERS  # here, not at the top: logging imports the engine's callbacks

        kinds = self.loggers()
        _require(
            isinstance(self.logger, str) and all(k in LOGGERS for k in kinds) and len(set(kinds)) == len(kinds),
            owner, "logger", self.logger, f"use 'none' or a comma-separated list of {list(LOGGERS)}",
        )
        _require(not kinds or self.log_dir is not None, owner, "log_dir", self.log_dir, f"give a directory for logger={self.logger!r}")
        _require(self.progress in (None, True, False), owner, "progress", self.progress, "use None (terminal only), True or False")
        _require(
            isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
            owner, "checkpoint_every", self.checkpoint_every, "use an integer >= 0 (0 disables checkpoints)",
        )
        _positive_int(owner, "keep_checkpoints", self.keep_checkpoints)
        needs_dir = self.checkpoint_every > 0 or self.resume == "latest"
        _require(
            not needs_dir or self.checkpoint_dir is not None, owner, "checkpoint_dir", self.checkpoint_dir,
            "give a directory for checkpoint_every > 0 or resume='latest'",
        )
        seed_ok = self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0)
        _require(seed_ok, owner, "seed", self.seed, "use an integer >= 0 or None")
