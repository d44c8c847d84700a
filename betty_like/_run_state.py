"""The engine's changing state, split by concern, and the read-only status it shows users."""

from __future__ import annotations

import ctypes
import platform
import random
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .hypergrad import HypergradInfo

try:  # a dependency, but a missing one must not break a step; imported once, not at every wave
    import numpy
except ImportError:  # pragma: no cover
    numpy = None
from .optim import Params, State


@dataclass
class Schedule:
    """Where a problem is in the schedule."""

    rounds: int = 0  # times it was due (every iteration for leaves; when all it reads reported for others)
    steps: int = 0  # steps taken (warm-up included, skipped steps not)
    since_report: int = 0  # steps since it last reported to its readers
    ready: set[str] = field(default_factory=set)  # problems it reads that reported since its last step


@dataclass
class Window:
    """An open unrolled window: weights and optimizer state that carry their graph to upper parameters."""

    params: Params
    state: State
    steps: int = 0  # steps since it opened (for truncation)

    @classmethod
    def opened(cls, leaves: Params, optimizer: Any) -> Window:
        """A window starting from copies of ``leaves`` (so the module can hold the latest weights) and the optimizer's state."""
        optimizer.reload_state()
        return cls({k: t.detach().clone().requires_grad_(True) for k, t in leaves.items()}, optimizer.state)

    def advanced(self, params: Params, state: State, mirror: Params) -> Window:
        """The window after one more step; its weights are copied into ``mirror`` (the user's module)."""
        with torch.no_grad():
            for key, leaf in mirror.items():
                leaf.copy_(params[key])
        return Window(params, state, self.steps + 1)


@dataclass
class Record:
    """What a problem's last step produced."""

    loss: float | None = None
    gradient: Params | None = None
    infos: dict[str, HypergradInfo] = field(default_factory=dict)
    skipped: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProblemStatus:
    """A read-only view of one problem, from :meth:`Engine.status`.

    Attributes:
        name: the problem.
        steps: steps taken (warm-up included, skipped ones not).
        loss: the loss of its last step.
        gradient: the (hyper)gradient handed to its optimizer at its last step, before clipping,
            keyed ``"<problem>.<param>"``.
        diagnostics: per lower problem, the push diagnostics of its last hypergradient (method and
            linear solve: iterations, residuals, convergence).
        skipped: steps skipped for a non-finite loss (``on_nonfinite="skip"``).
        window_open: whether it holds unrolled steps not yet consumed by the problems above it.
        metrics: the scalars its last step reported (a dict returned by ``training_step``, ``self.log``).
    """

    name: str
    steps: int
    loss: float | None
    gradient: Mapping[str, torch.Tensor] | None
    diagnostics: Mapping[str, HypergradInfo]
    skipped: int
    window_open: bool
    metrics: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, name: str, schedule: Schedule, record: Record, window: Window | None) -> ProblemStatus:
        gradient = None if record.gradient is None else MappingProxyType(dict(record.gradient))
        return cls(
            name, schedule.steps, record.loss, gradient, MappingProxyType(dict(record.infos)), record.skipped, window is not None,
            MappingProxyType(dict(record.metrics)),
        )


class _Reread:
    """One global generator's state, read in full only when its raw words changed since the last read.

    The engine snapshots every generator at each wave (its transaction), and the full reads are the
    costly part of a small step: ``random.getstate()`` builds 625 Python ints (~8 µs alone on the
    shared test machine), ``numpy.random.get_state()`` copies its state through Python (40-70 µs).
    The raw Mersenne Twister words (~1 µs to read) say whether anything drew since: for Python's
    generator they are its whole state with ``gauss_next``, so the reuse is exact. ``words()`` returns them, or ``None`` where they
    cannot be read (then every snapshot is a full read); ``spent(state)`` says whether a state holds
    something that can change without them (numpy's cached Gaussian).
    """

    def __init__(self, read: Callable[[], Any], words: Callable[[], Any], spent: Callable[[Any], bool]) -> None:
        self.read, self.words, self.spent = read, words, spent
        self.last: Any = None
        self.state: Any = None

    def get(self) -> Any:
        """What ``read()`` returns now (the previous result when nothing drew since)."""
        words = self.words()
        if words is None or words != self.last or self.spent(self.state):
            self.last, self.state = words, self.read()
        return self.state


_MT19937_BYTES = 624 * 4 + ctypes.sizeof(ctypes.c_int)  # the twister's 624 words and its position


def _numpy_words() -> Any:
    """numpy's global bit generator and its mt19937_state (uint32 key[624]; int pos), through numpy's public ctypes interface."""
    get_generator = getattr(numpy.random, "get_bit_generator", None)  # numpy >= 1.25
    generator = get_generator() if get_generator is not None else None
    if not isinstance(generator, numpy.random.MT19937):
        return None
    return generator, ctypes.string_at(generator.ctypes.state_address, _MT19937_BYTES)


def _python_words() -> Any:
    """Python's global generator: CPython's RandomObject after the object header (int index; uint32 state[624]), and gauss_next.

    Python has no public raw view, so this reads the object's memory, and only where
    :data:`_PYTHON_LAYOUT` checked at import that those bytes are what ``random.getstate()`` says.
    """
    if not _PYTHON_LAYOUT:
        return None
    generator = random.getstate.__self__
    return ctypes.string_at(id(generator) + object.__basicsize__, _MT19937_BYTES), generator.gauss_next


def _python_layout() -> bool:
    """Whether this interpreter stores Python's generator as :func:`_python_words` reads it (CPython, default build)."""
    try:
        state = random.getstate()[1]
        raw = ctypes.string_at(id(random.getstate.__self__) + object.__basicsize__, _MT19937_BYTES)
        index, *words = struct.unpack(f"i{len(state) - 1}I", raw)
    except (struct.error, TypeError, ValueError, AttributeError):
        return False
    return tuple(words) == state[:-1] and index == state[-1]


_PYTHON_LAYOUT = platform.python_implementation() == "CPython" and _python_layout()
_python_state = _Reread(random.getstate, _python_words, lambda state: False)
# a legacy Gaussian cached in numpy's state (has_gauss = 1) is spent by the next draw without moving a word
_numpy_state = _Reread(numpy.random.get_state, _numpy_words, lambda state: bool(state[3])) if numpy is not None else None


def random_states() -> dict[str, Any]:
    """Every generator a step may draw from (python, numpy if present, torch CPU and CUDA)."""
    states: dict[str, Any] = {"python": _python_state.get(), "torch": torch.get_rng_state()}
    if _numpy_state is not None:
        states["numpy"] = _numpy_state.get()
    if torch.cuda.is_initialized():  # never initialized without CUDA: the cheap test first
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        numpy.random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def seeded(seed: int | None) -> bool:
    """Seed torch's generators with ``seed`` (once per engine: the caller keeps the answer); whether it did."""
    if seed is None:
        return False
    torch.manual_seed(seed)
    return True
