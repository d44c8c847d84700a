"""``"auto"`` for convolutions: time the candidates once per input configuration, remember the winner.

The key is everything the speed depends on: device (and GPU name), torch version and thread count,
dtype and autocast, input shape and layout, the layer's geometry, and whether gradients are
needed. For a new key every candidate runs on detached copies of the real input and weights,
forward and (when the call needs gradients) backward, interleaved round-robin so that a burst of
load on a shared machine hits all candidates alike. A probe of each (its second run, the first
pays one-off allocation costs) prunes those slower than ``prune`` times the fastest probe (they cannot win, and timing them is the bulk of the search
on large inputs); the rest get ``warmup`` untimed runs and the median of ``repeats`` timed ones. ``torch`` is kept unless a candidate beats it by more than ``margin`` *and*
by more than ``min_saving_ms`` per call: noise cannot make ``auto`` switch on a coin flip, and on
tiny layers, where wins of up to ~80 microseconds measured in isolation turned into a slower
training step inside the model (digits CNN, see docs/backends/conv.md), the passthrough stays.
The defaults (10%, 0.1 ms) are twice the run-to-run noise measured on a shared 2-core CPU.

Choices live in memory and in a JSON file (default ``$BETTY_LIKE_CACHE_DIR/conv_auto.json``, else
``$XDG_CACHE_HOME/betty_like/`` or ``~/.cache/betty_like/``), written atomically, so the next run
skips the search. The file only saves re-timing, so it can never stop training: a read or write
fault (unwritable directory, a file where a directory should be or the reverse, corrupt JSON) is
logged once with the path and the choices stay in memory; an entry read from the file is used only
if its choice is one of this layer's candidates (else it is timed again and the file is named);
writers merge under an exclusive lock on ``<file>.lock``, so processes sharing a cache lose nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: writers are atomic but not serialized
    fcntl = None  # type: ignore[assignment]

import torch
from torch import Tensor, nn

from ..registry import algorithm
from ._common import autocast_dtype, is_channels_last

log = logging.getLogger("betty_like")
_FORMAT = 1


def default_cache_path() -> Path:
    """Where choices persist unless a path is given (see the module docstring)."""
    root = os.environ.get("BETTY_LIKE_CACHE_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "betty_like")
    return Path(root) / "conv_auto.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def tuning_key(layer: nn.Conv2d, x: Tensor, train: bool, candidates: list[str]) -> str:
    """The JSON-ready key of one tuning decision."""
    autocast = autocast_dtype(x.device.type)
    fields: dict[str, Any] = {
        "device": _device_name(x.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(x.dtype),
        "autocast": str(autocast) if autocast is not None else None,
        "input": list(x.shape),
        "channels_last": is_channels_last(x),
        "layer": layer.extra_repr(),
        "train": train,
        "candidates": sorted(candidates),
    }
    return json.dumps(fields, sort_keys=True)


class ConvTuner:
    """Times convolution candidates and caches the choices in memory and in a JSON file.

    Args:
        path: the JSON file; ``None`` uses :func:`default_cache_path`.
        persist: write new choices to the file (reading it is always tried).
        warmup: untimed runs of every candidate before timing.
        repeats: timed runs of every candidate; the median counts.
        margin: a candidate replaces ``torch`` only if it is faster by more than this fraction.
        prune: candidates whose probe is slower than this factor times the fastest are not timed further.
        min_saving_ms: a candidate replaces ``torch`` only if it also saves more than this per call.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        persist: bool = True,
        warmup: int = 3,
        repeats: int = 7,
        margin: float = 0.10,
        prune: float = 3.0,
        min_saving_ms: float = 0.1,
    ) -> None:
        if warmup < 0 or repeats < 1 or not 0 <= margin < 1 or prune < 1 or min_saving_ms < 0:
            raise ValueError(
                f"ConvTuner(warmup={warmup}, repeats={repeats}, margin={margin}, prune={prune}): use warmup >= 0, "
                "repeats >= 1, 0 <= margin < 1, prune >= 1 and min_saving_ms >= 0"
            )
        self.path = Path(path) if path is not None else default_cache_path()
        self.persist, self.warmup, self.repeats, self.margin, self.prune = persist, warmup, repeats, margin, prune
        self.min_saving_ms = min_saving_ms
        self.entries: dict[str, dict[str, Any]] | None = None
        self.searches = 0  # how many keys were timed (not found in memory or the file)
        self.faults: list[str] = []  # cache faults met so far, each logged once

    def choose(self, layer: nn.Module, x: Tensor, candidates: list[str]) -> tuple[str, str]:
        """The algorithm for ``layer`` on inputs like ``x``, and a note with the timings it rests on."""
        train = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))
        key = tuning_key(layer, x, train, candidates)
        entries = self._entries()
        if key in entries and not self._valid(entries[key], candidates, layer):
            del entries[key]
        if key not in entries:
            self.searches += 1
            times, pruned = self._time(layer, x, train, candidates)
            entries[key] = {"choice": self._pick(times), "ms": times, "pruned_probe_ms": pruned}
            if self.persist:
                self._save(key, entries[key])
        entry = entries[key]
        timings = ", ".join(f"{n} {t:.3g}" for n, t in sorted(entry["ms"].items(), key=lambda kv: kv[1]))
        pruned = "".join(f", {n} pruned ({t:.3g} probe)" for n, t in entry.get("pruned_probe_ms", {}).items())
        return entry["choice"], f"auto ({'fwd+bwd' if train else 'fwd'} ms: {timings}{pruned})"

    def _valid(self, entry: Any, candidates: list[str], layer: nn.Module) -> bool:
        """Whether a cached entry can be used for ``layer``: a known candidate and well-formed timings."""
        ok = (
            isinstance(entry, dict)
            and entry.get("choice") in candidates
            and isinstance(entry.get("ms"), dict)
            and all(isinstance(t, (int, float)) for t in entry["ms"].values())
            and isinstance(entry.get("pruned_probe_ms", {}), dict)
        )
        if not ok:
            choice = entry.get("choice") if isinstance(entry, dict) else entry
            self._fault(
                f"conv2d auto: cache {self.path} holds {choice!r} for layer ({layer.extra_repr()}), which is not one "
                f"of its candidates {candidates} or is malformed; timing it again",
                once=False,
            )
        return ok

    def _fault(self, message: str, *, once: bool = True) -> None:
        """Log a cache fault (once per distinct message when ``once``): the cache only saves re-timing."""
        if once and message in self.faults:
            return
        self.faults.append(message)
        log.warning("%s", message)

    def _pick(self, times: dict[str, float]) -> str:
        best = min(times, key=times.__getitem__)
        if "torch" in times and (
            times[best] >= (1 - self.margin) * times["torch"] or times["torch"] - times[best] <= self.min_saving_ms
        ):
            return "torch"
        return best

    def _time(
        self, layer: nn.Module, x: Tensor, train: bool, candidates: list[str]
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Median milliseconds per timed candidate and probe milliseconds of the pruned ones,
        measured on detached copies (no gradient reaches the model)."""
        with torch.enable_grad() if train else torch.no_grad():
            xd = x.detach().requires_grad_(train and x.requires_grad)
            wd = layer.weight.detach().requires_grad_(train and layer.weight.requires_grad)
            bd = None if layer.bias is None else layer.bias.detach().requires_grad_(train and layer.bias.requires_grad)
            inputs = [t for t in (xd, wd, bd) if t is not None and t.requires_grad]
            impls = {name: algorithm("conv2d", name).impl for name in candidates}
            upstream = torch.randn_like(algorithm("conv2d", "torch").impl(layer, xd, wd, bd)) if train else None

            def run(name: str) -> None:
                y = impls[name](layer, xd, wd, bd)
                if train:
                    torch.autograd.grad(y, inputs, upstream)

            sync = torch.cuda.synchronize if x.device.type == "cuda" else _no_sync

            def timed(name: str) -> float:
                sync()
                start = time.perf_counter()
                run(name)
                sync()
                return (time.perf_counter() - start) * 1e3

            probe: dict[str, float] = {}
            for name in candidates:
                try:
                    run(name)
                    probe[name] = timed(name)
                except (RuntimeError, ValueError, TypeError) as error:  # e.g. out of memory: not a candidate here
                    log.warning("conv2d auto: %s failed on %s (%s); not a candidate for it", name, layer, error)
            fastest = min(probe.values())
            names = [n for n in probe if probe[n] <= self.prune * fastest or n == "torch"]
            for _ in range(self.warmup):
                for name in names:
                    run(name)
            samples: dict[str, list[float]] = {n: [] for n in names}
            for r in range(self.repeats):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    samples[name].append(timed(name))
        pruned = {n: t for n, t in probe.items() if n not in samples}
        return {n: statistics.median(s) for n, s in samples.items()}, pruned

    def _entries(self) -> dict[str, dict[str, Any]]:
        if self.entries is None:
            self.entries = self._read()
        return self.entries

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            self._fault(f"conv2d auto: ignoring unreadable cache {self.path} ({error}); choices will be timed again")
            return {}
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("entries"), dict):
            self._fault(f"conv2d auto: ignoring cache {self.path} written in another format")
            return {}
        return data["entries"]

    def _save(self, key: str, entry: dict[str, Any]) -> None:
        """Merge one entry into the file under the lock; a fault is logged once and the choice stays in memory."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                entries = self._read()
                entries[key] = entry
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({"format": _FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
                    os.replace(tmp, self.path)
                except BaseException:
                    os.unlink(tmp)
                    raise
        except OSError as error:
            self.persist = False  # one fault is enough to know: later choices stay in memory without retrying
            self._fault(
                f"conv2d auto: cannot write the cache {self.path} ({error}); choices are kept in memory for this "
                "run only (set BETTY_LIKE_CACHE_DIR to a writable directory to keep them)"
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on ``<file>.lock`` so concurrent writers' read-merge-replace do not interleave."""
        if fcntl is None:
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _no_sync() -> None:
    """CPU work is finished when the call returns: nothing to wait for."""


_DEFAULT: ConvTuner | None = None


def default_tuner() -> ConvTuner:
    """The process-wide tuner (one in-memory cache for every swap), re-made if the default path moved."""
    global _DEFAULT
    if _DEFAULT is None or _DEFAULT.path != default_cache_path():
        _DEFAULT = ConvTuner()
    return _DEFAULT
