"""Callbacks: user hooks and the engine's own policies (progress, logging, checkpoints), called at fixed points.

The engine calls every callback's hooks in order at these points, and nowhere else:

- ``on_run_start(engine)``: at the start of :meth:`Engine.run` (a resumed run's state is loaded here).
- ``on_step_start(engine, name)`` / ``on_step_end(engine, name)``: around each taken or skipped step
  of problem ``name`` (``engine.status(name)`` has its loss and gradient at ``on_step_end``).
- ``on_iteration_end(engine)``: after every iteration, when no wave is pending (logs, checkpoints).
- ``on_validation_end(engine, results)``: after :meth:`Engine.validate`, with its results.
- ``on_run_end(engine)``: when :meth:`Engine.run` finishes (also after an exception).

Betty users who wrote ``Env`` or ``on_inner_loop_start`` write a :class:`Callback` subclass.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the engine imports this module; callbacks only receive it
    from .engine import Engine

HOOKS = ("on_run_start", "on_step_start", "on_step_end", "on_iteration_end", "on_validation_end", "on_run_end")


class Callback:
    """Override any of the hooks; each default does nothing."""

    restores = False  # True: its on_run_start restores the engine's state, so it runs before every other one

    def on_run_start(self, engine: Engine) -> None:
        """The run starts (or continues)."""

    def on_step_start(self, engine: Engine, name: str) -> None:
        """Problem ``name`` is about to compute a step."""

    def on_step_end(self, engine: Engine, name: str) -> None:
        """Problem ``name`` finished a step (taken or skipped)."""

    def on_iteration_end(self, engine: Engine) -> None:
        """Iteration ``engine.iteration`` is complete."""

    def on_validation_end(self, engine: Engine, results: dict[str, dict[str, float]]) -> None:
        """:meth:`Engine.validate` returned ``results``."""

    def on_run_end(self, engine: Engine) -> None:
        """The run stopped: finished, interrupted or failed."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores for this callback (plain values and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def _overrides(callback: Callback, hook: str) -> bool:
    """Whether ``callback`` does something at ``hook`` (its class or the instance replaces the no-op default)."""
    return getattr(type(callback), hook) is not getattr(Callback, hook) or hook in vars(callback)


class Callbacks:
    """The engine's ordered callbacks; a hook that raises names the callback and the hook.

    Each hook goes only to the callbacks that override it: the list per hook is worked out once and
    again whenever ``items`` changes, since the step hooks run several times per iteration and most
    callbacks (the logging and checkpoint policies) override none of them.
    """

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        self.items = list(callbacks)
        for c in self.items:
            if not isinstance(c, Callback):
                raise TypeError(f"callbacks must be betty_like.Callback instances, got {type(c).__name__}")
        self._seen: list[Callback] = []
        self._by_hook: dict[str, list[Callback]] = {}

    def call(self, hook: str, engine: Engine, *args: Any) -> None:
        """Call ``hook`` on every callback that overrides it; an error names the callback and the hook."""
        if self._seen != self.items:
            self._seen, self._by_hook = list(self.items), {}
        items = self._by_hook.get(hook)
        if items is None:
            items = [c for c in self._seen if _overrides(c, hook)]
            if hook == "on_run_start":  # restoring callbacks (a checkpoint resume) first: the others start from the restored state
                items.sort(key=lambda c: not c.restores)
            self._by_hook[hook] = items
        for callback in items:
            try:
                getattr(callback, hook)(engine, *args)
            except Exception as error:
                if hasattr(error, "add_note"):
                    error.add_note(f"(raised in {type(callback).__name__}.{hook})")
                raise
