"""Learning curves for the example notebooks: each problem's loss from ``engine.history``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import matplotlib.pyplot as plt


def plot_history(history: Iterable[Mapping[str, Any]], title: str, log_scale: bool = False) -> plt.Figure:
    """One panel per problem: its loss at each logged iteration (``EngineConfig.log_every``)."""
    by_problem: dict[str, tuple[list[int], list[float]]] = {}
    for row in history:
        steps, losses = by_problem.setdefault(row["problem"], ([], []))
        steps.append(row["iteration"])
        losses.append(row["loss"])
    if not by_problem:
        raise ValueError("the history is empty: the run logged no loss (train longer than log_every iterations)")
    fig, axes = plt.subplots(1, len(by_problem), figsize=(4 * len(by_problem), 3), squeeze=False)
    for ax, (name, (steps, losses)) in zip(axes[0], by_problem.items(), strict=True):
        ax.plot(steps, losses, marker="." if len(steps) < 30 else None)
        ax.set(title=f"{name} loss", xlabel="iteration", yscale="log" if log_scale else "linear")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
