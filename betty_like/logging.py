"""Progress bar, metrics and scalar loggers: policies the engine calls after each iteration.

Every ``log_every`` iterations one row of scalars is written, the same tags to every logger:

- ``<problem>/loss`` and ``<problem>/<metric>`` (a ``training_step`` that returns a dict, or ``self.log``),
- ``<problem>/hypergrad_norm``: the norm of the gradient handed to its optimizer at its last step,
- ``<problem>/<lower>/solver_iterations`` and ``.../solver_residual`` from ``status().diagnostics``,
- ``<problem>/lr`` (``lr_<group>`` with several parameter groups),
- ``time/step_s`` (wall seconds per iteration since the last row) and ``memory/peak_mb``.

The CSV file is long-form (``iteration,tag,value``) so that metrics appearing late (a hypergradient's
solver) need no header rewrite; ``pandas.read_csv(...).pivot(index="iteration", columns="tag")``
gives a wide table. TensorBoard gets the same tags through ``SummaryWriter``.
"""

from __future__ import annotations

import csv
import math
import os
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .callbacks import Callback

if TYPE_CHECKING:
    from .engine import Engine

LOGGERS = ("csv", "tensorboard")


class Metrics:
    """Scalars a problem reports during its step's own loss evaluation (the first one of the step).

    Losses are also evaluated inside hypergradients (perturbed or unrolled weights); only the first
    evaluation after the step starts is the step's, so only it records metrics.
    """

    def __init__(self) -> None:
        self._pending: set[str] = set()
        self._current: str | None = None
        self._values: dict[str, dict[str, Any]] = {}
        self._entered: list[str] = []  # the evaluations under way, innermost last
        self._outer: list[str | None] = []  # the problem recording before each of them

    def begin(self, name: str) -> None:
        self._pending.add(name)
        self._values[name] = {}

    def evaluating(self, name: str) -> Metrics:
        """``with metrics.evaluating(name) as capturing``: around one evaluation of ``name``'s loss.

        ``capturing`` says whether it is the step's own evaluation (the one that records metrics). A
        plain context manager on ``self`` (evaluations nest, so it keeps a stack): a generator-based
        one costs several µs at every loss.
        """
        self._entered.append(name)
        return self

    def __enter__(self) -> bool:
        name = self._entered[-1]
        capturing = name in self._pending
        self._outer.append(self._current)
        self._current = name if capturing else None
        return capturing

    def __exit__(self, *_: object) -> None:
        self._current = self._outer.pop()
        self._pending.discard(self._entered.pop())

    def log(self, owner: str, key: str, value: Any) -> None:
        """Record ``key`` for ``owner``'s current step (ignored outside its step's own evaluation)."""
        if not isinstance(key, str) or not key or key == "loss":
            raise ValueError(f"problem {owner!r}: self.log({key!r}, ...) needs a metric name other than 'loss'")
        if self._current == owner:
            self._values[owner][key] = value.detach() if torch.is_tensor(value) else float(value)

    def record(self, owner: str, values: Mapping[str, Any]) -> None:
        """Record ``values`` for ``owner``'s current step (a captured step's dict result, evaluated once)."""
        for key, value in values.items():
            self._values.setdefault(owner, {})[key] = value.detach() if torch.is_tensor(value) else float(value)

    def split(self, owner: str, out: Any, capturing: bool) -> Any:
        """The loss of a ``training_step`` result; a dict's other scalars are recorded as metrics."""
        if torch.is_tensor(out) or not isinstance(out, Mapping):  # the tensor test first: an ABC check costs more
            return out
        if "loss" not in out:
            raise ValueError(
                f"problem {owner!r}: training_step returned a dict without 'loss' (keys {sorted(out)}); "
                "return {'loss': loss, 'accuracy': ...}"
            )
        if capturing:
            for key, value in out.items():
                if key != "loss":
                    self.log(owner, key, value)
        return out["loss"]

    def take(self, name: str) -> dict[str, Any]:
        self._pending.discard(name)
        return self._values.pop(name, {})


def is_rank_zero() -> bool:
    """Whether this process logs and shows progress: rank 0, or the only process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA's allocator peak if CUDA is in use, else the peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def scalars(engine: Engine) -> dict[str, float]:
    """The logged fields of every problem's last step (see the module docstring)."""
    row: dict[str, float] = {}
    for name, problem in engine.problems.items():
        status = engine.status(name)
        if status.loss is not None:
            row[f"{name}/loss"] = status.loss
        for key, value in status.metrics.items():
            row[f"{name}/{key}"] = float(value)
        if status.gradient:
            row[f"{name}/hypergrad_norm"] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in status.gradient.values()))
        for lower, info in status.diagnostics.items():
            if info.solve is not None:
                row[f"{name}/{lower}/solver_iterations"] = float(info.solve.iterations)
                row[f"{name}/{lower}/solver_residual"] = float(info.solve.residual)
        groups = problem.optimizer.param_groups
        for i, group in enumerate(groups):
            row[f"{name}/lr" if len(groups) == 1 else f"{name}/lr_{i}"] = float(group["lr"])
    return row


class CSVLogger:
    """Appends ``iteration,tag,value`` rows to ``<log_dir>/metrics.csv``."""

    def __init__(self, log_dir: Path) -> None:
        self.path = log_dir / "metrics.csv"

    def start(self, iteration: int) -> None:
        """Drop rows past ``iteration`` (written after the checkpoint a resumed run started from)."""
        if self.path.exists():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            kept = [r for r in rows if int(r[0]) <= iteration]
            if len(kept) != len(rows):
                with self.path.open("w", newline="") as f:
                    csv.writer(f).writerows([["iteration", "tag", "value"], *kept])
        else:
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(["iteration", "tag", "value"])

    def write(self, iteration: int, row: Mapping[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerows([iteration, tag, repr(value)] for tag, value in row.items())

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """The same scalars through ``torch.utils.tensorboard.SummaryWriter`` (needs ``tensorboard``)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def start(self, iteration: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "EngineConfig(logger='tensorboard') needs the tensorboard package: pip install 'betty-like[logs]'"
            ) from error
        self.writer = SummaryWriter(str(self.log_dir), purge_step=iteration + 1 if iteration else None)

    def write(self, iteration: int, row: Mapping[str, float]) -> None:
        for tag, value in row.items():
            self.writer.add_scalar(tag, value, iteration)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Logging(Callback):
    """Writes :func:`scalars` every ``log_every`` iterations to the configured loggers (rank 0 only)."""

    def __init__(self, kinds: list[str], log_dir: str, log_every: int) -> None:
        path = Path(log_dir)
        made = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}
        self.loggers = [made[k](path) for k in kinds] if is_rank_zero() else []
        self.log_dir, self.log_every = path, log_every
        self._clock: tuple[int, float] | None = None

    def on_run_start(self, engine: Engine) -> None:
        if self.loggers:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        for logger in self.loggers:
            logger.start(engine.iteration)
        self._clock = (engine.iteration, time.perf_counter())

    def on_iteration_end(self, engine: Engine) -> None:
        if not self.loggers or engine.iteration % self.log_every:
            return
        row = scalars(engine)
        now = time.perf_counter()
        if self._clock is not None and engine.iteration > self._clock[0]:
            row["time/step_s"] = (now - self._clock[1]) / (engine.iteration - self._clock[0])
        self._clock = (engine.iteration, now)
        row["memory/peak_mb"] = peak_memory_mb()
        for logger in self.loggers:
            logger.write(engine.iteration, row)

    def on_run_end(self, engine: Engine) -> None:
        for logger in self.loggers:
            logger.close()


class Progress(Callback):
    """A tqdm bar over iterations with each problem's last loss; tqdm shows iterations/s."""

    def __init__(self, forced: bool) -> None:
        self.forced = forced
        self.bar: Any = None

    def on_run_start(self, engine: Engine) -> None:
        if not is_rank_zero() or not (self.forced or sys.stderr.isatty()):
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=engine.config.train_iters, initial=engine.iteration, desc="betty_like", unit="it")

    def on_iteration_end(self, engine: Engine) -> None:
        if self.bar is None:
            return
        losses = {n: engine.status(n).loss for n in engine.problems}
        self.bar.set_postfix({n: f"{v:.4g}" for n, v in losses.items() if v is not None}, refresh=False)
        self.bar.update(1)

    def on_run_end(self, engine: Engine) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def log_policies(config: Any) -> list[Callback]:
    """The progress and logging policies an :class:`~betty_like.config.EngineConfig` asks for."""
    made: list[Callback] = []
    if config.progress is not False:
        made.append(Progress(forced=config.progress is True))
    kinds = config.loggers()
    if kinds:
        made.append(Logging(kinds, config.log_dir, config.log_every))
    return made
