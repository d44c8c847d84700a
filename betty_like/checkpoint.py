"""Checkpoints: atomic saves and an exact resume.

A checkpoint holds everything the next iteration depends on: every module's parameters and
buffers, the optimizers' and schedulers' state, the engine's counters and schedule, open unrolled
windows, the random generators (python, numpy, torch, CUDA), each problem's data position (batches
drawn: a resumed run re-creates it by drawing and dropping as many batches from its freshly built
data) and the history. Loggers continue at the checkpoint's iteration (rows written after it, by a
run that died, are dropped).

**Exact resume.** Checkpoints are written only at iteration boundaries where no unrolled window is
open (a checkpoint due while one is open waits for the first iteration that closes them, which is
one upper step later), so the resumed run is bit-identical to an uninterrupted one. :func:`save`
called directly while a window is open stores its weights and state detached: the resumed window
continues from them, but the differentiable history before the checkpoint is cut, so the next upper
hypergradient sees only the steps after it (the run is no longer bit-identical; a warning says so).
Data positions are exact for data whose order does not draw on the global random generators when
it is re-iterated (lists, tensors, seeded generators, a ``DataLoader`` with its own ``generator``).

**Safety.** A checkpoint is written to a temporary file, fsynced and renamed into place, so a process
killed during a save leaves the previous checkpoints intact and only a stray ``.tmp`` file. Files are
loaded with ``torch.load(weights_only=True)``. A truncated or corrupt file, or one written for a
different program (problems, edges, parameter shapes, problem configs), raises
:class:`CheckpointError` naming the file and what differs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._run_state import Window
from .callbacks import Callback
from .hypergrad import HypergradInfo, SolveInfo
from .logging import is_rank_zero

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("betty_like")
FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or written for another program."""


def fingerprint(engine: Engine) -> dict[str, Any]:
    """What must match for a checkpoint to fit this program."""
    graph = engine.graph
    return {
        "problems": sorted(engine.problems),
        "u2l": {n: sorted(graph.u2l[n]) for n in sorted(graph.names)},
        "l2u": {n: sorted(graph.l2u[n]) for n in sorted(graph.names)},
        "parameters": {
            n: {k: list(t.shape) for k, t in p.module.state_dict().items()} for n, p in sorted(engine.problems.items())
        },
        "configs": {
            n: {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v) for k, v in dataclasses.asdict(p.config).items()}
            for n, p in sorted(engine.problems.items())
        },
    }


def _random_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss], "torch": torch.get_rng_state()}
    try:
        import numpy

        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_random_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(i) for i in internal.tolist()), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_of(engine: Engine) -> dict[str, Any]:
    """The checkpoint of ``engine`` at an iteration boundary, as plain values and tensors."""
    if engine._pending:
        raise RuntimeError("a checkpoint is taken between iterations: an interrupted iteration is still pending")
    problems = {}
    for name, problem in engine.problems.items():
        schedule, record, window = engine._schedule[name], engine._records[name], engine._windows[name]
        problems[name] = {
            "module": problem.module.state_dict(),
            "optimizer": problem.optimizer.state_dict(),
            "scheduler": problem.scheduler.state_dict() if problem.scheduler is not None else None,
            "schedule": [schedule.rounds, schedule.steps, schedule.since_report, sorted(schedule.ready)],
            "record": [record.loss, record.skipped, record.gradient, record.metrics, {k: dataclasses.asdict(i) for k, i in record.infos.items()}],
            "window": None
            if window is None
            else {
                "params": {k: v.detach().clone() for k, v in window.params.items()},
                "state": {k: {s: v.detach().clone() for s, v in d.items()} for k, d in window.state.items()},
                "steps": window.steps,
            },
            "drawn": engine._setups[name].stream.drawn,
            "curvature": [engine._setups[name].eigenvalue.value, engine._setups[name].eigenvalue.solves],
        }
    return {
        "format": FORMAT,
        "program": fingerprint(engine),
        "iteration": engine.iteration,
        "seeded": engine._seeded,
        "problems": problems,
        "random": _random_state(),
        "history": list(engine.history),
        "validation_history": list(engine.validation_history),
        "callbacks": [c.state_dict() for c in engine.callbacks.items],
    }


def save(engine: Engine, path: str | os.PathLike) -> Path:
    """Write ``engine``'s checkpoint to ``path`` atomically (temp file, fsync, rename); returns the path."""
    path = Path(path)
    if any(w is not None for w in engine._windows.values()):
        log.warning(
            "checkpoint %s: unrolled windows are open; their weights are saved detached, so a run resumed from it "
            "cuts the differentiable history before it (not bit-identical)", path
        )
    state = state_of(engine)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def read(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file safely (``weights_only``); :class:`CheckpointError` names the file if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} cannot be read, it is truncated or corrupt ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); resume from an earlier checkpoint in {path.parent}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} is not a betty_like checkpoint of format {FORMAT} (found {found!r})")
    return state


def _differences(saved: dict[str, Any], current: dict[str, Any], where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in [*current, *(k for k in saved if k not in current)]:
            if key not in saved or key not in current:
                out.append(f"{where}{key}: {'missing in the checkpoint' if key not in saved else 'not in this program'}")
            else:
                out += _differences(saved[key], current[key], f"{where}{key}.")
        return out
    return [] if saved == current else [f"{where.rstrip('.')}: checkpoint {saved!r}, this program {current!r}"]


def load(engine: Engine, path: str | os.PathLike) -> None:
    """Restore ``engine`` (freshly built, not yet run) from the checkpoint at ``path``."""
    state = read(path)
    differences = _differences(state["program"], fingerprint(engine))
    if differences:
        raise CheckpointError(f"checkpoint {path} was written for a different program: " + "; ".join(differences[:5]))
    if engine.iteration or any(s.stream.drawn for s in engine._setups.values()):
        raise CheckpointError(f"checkpoint {path}: load it into a freshly built engine that has not run yet")
    for name, problem in engine.problems.items():
        saved, setup = state["problems"][name], engine._setups[name]
        problem.module.load_state_dict(saved["module"])
        problem.optimizer.load_state_dict(saved["optimizer"])
        setup.functional.reload_state()
        if saved["scheduler"] is not None:
            if problem.scheduler is None:
                raise CheckpointError(f"checkpoint {path}: problem {name!r} had a scheduler, this one has none")
            problem.scheduler.load_state_dict(saved["scheduler"])
        schedule = engine._schedule[name]
        schedule.rounds, schedule.steps, schedule.since_report, ready = saved["schedule"]
        schedule.ready = set(ready)
        record = engine._records[name]
        record.loss, record.skipped, record.gradient, record.metrics, infos = saved["record"]
        record.infos = {k: HypergradInfo(i["problem"], i["method"], i["solve"] and SolveInfo(**i["solve"])) for k, i in infos.items()}
        window = saved["window"]
        if window is not None:
            device = {k: t.device for k, t in setup.leaves.items()}
            params = {k: v.to(device[k]).requires_grad_(True) for k, v in window["params"].items()}
            states = {k: {s: v.to(device[k]) for s, v in d.items()} for k, d in window["state"].items()}
            engine._windows[name] = Window(params, states, window["steps"])
        setup.eigenvalue.value, setup.eigenvalue.solves = saved.get("curvature", [None, 0])
        last = setup.stream.skip(saved["drawn"], state["iteration"])
        if saved["drawn"]:
            engine._batches[name] = last
    engine.iteration, engine._seeded = state["iteration"], state["seeded"]
    engine.history[:], engine.validation_history[:] = state["history"], state["validation_history"]
    for callback, saved in zip(engine.callbacks.items, state["callbacks"], strict=False):
        callback.load_state_dict(saved)
    _set_random_state(state["random"])


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first (temporary files of killed saves excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


class Checkpointing(Callback):
    """Saves every ``every`` iterations (at the next boundary with no open window), keeps the newest ``keep``,
    and resumes at the start of a run."""

    def __init__(self, directory: str | None, every: int, keep: int, resume: str | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.every, self.keep, self.resume = every, keep, resume
        self._due = False

    restores = True

    def on_run_start(self, engine: Engine) -> None:
        if self.resume is None or engine.iteration:
            return
        if self.resume == "latest":
            found = checkpoints(self.directory)
            if not found:
                log.info("resume='latest': no checkpoint in %s yet, starting fresh", self.directory)
                return
            path = found[-1]
        else:
            path = Path(self.resume)
        load(engine, path)
        log.info("resumed from %s at iteration %d", path, engine.iteration)

    def on_iteration_end(self, engine: Engine) -> None:
        if not self.every:
            return
        self._due = self._due or engine.iteration % self.every == 0
        if not self._due or any(engine.status(n).window_open for n in engine.problems):
            return
        self._due = False
        if not is_rank_zero():  # every rank holds the same state; one writes it
            return
        save(engine, self.directory / f"ckpt-{engine.iteration:08d}.pt")
        for old in checkpoints(self.directory)[: -self.keep]:
            old.unlink()


def checkpoint_policies(config: Any) -> list[Callback]:
    """The checkpoint policy an :class:`~betty_like.config.EngineConfig` asks for (none if it asks none)."""
    if not config.checkpoint_every and config.resume is None:
        return []
    return [Checkpointing(config.checkpoint_dir, config.checkpoint_every, config.keep_checkpoints, config.resume)]
