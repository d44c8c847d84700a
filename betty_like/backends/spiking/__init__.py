"""BRUNO-style spiking networks: forward at a fine time step, backward on a coarse grid.

Device-level neuron models need microsecond steps, so backpropagation through time (BPTT) over every
fine step stores millions of states. :class:`SpikingNetwork` splits time into windows of
``fine_per_coarse`` fine steps and, per window:

1. runs the fine steps under ``torch.no_grad`` from the window's start state, giving the exact end
   state, a summary of each layer's spikes (``reduce``: spike ``count``, ``mean`` rate, or the
   ``last`` fine step) and the surrogate derivative at every fine step, reduced the same way;
2. takes one differentiable coarse step of length ``dt_coarse`` from the same start state, with the
   window's summarized input; the spike summary's gradient is that reduced surrogate derivative
   times the gradient of the coarse membrane (every fine spike is taken to move with it);
3. splices ``s = s_coarse + (s_fine - s_coarse).detach()`` for every state and spike summary.

Forward values are those of the fine simulation; gradients follow the coarse model; the autograd
graph holds one step per window, so memory grows with the coarse step count, not the fine one.
With ``fine_per_coarse=1`` the coarse step *is* the fine step and the splice is skipped, which is
exactly plain BPTT at the fine step: one code path for both.

Second order: at ``fine_per_coarse=1`` every op has its exact double backward. Above it, the
fine-trajectory surrogate derivative is a constant of the coarse model (computed without a graph),
so a learnable surrogate slope gets no gradient there and second-order terms through the surrogate
derivative are dropped; thresholds and time constants still get hypergradients through the coarse
dynamics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._memory import SavedTensorMeter
from ._neurons import LIF, NEURONS, FeLIF, Neuron, Readout, State
from ._surrogate import (
    SECOND_ORDER_METHODS,
    Surrogate,
    check_hypergrad_support,
    spike,
    surrogate,
)
from ._synapse import QuantizedLinear, quantize

REDUCTIONS = ("count", "mean", "last")

__all__ = [
    "SECOND_ORDER_METHODS",
    "FeLIF",
    "LIF",
    "Neuron",
    "QuantizedLinear",
    "Readout",
    "SavedTensorMeter",
    "SpikingLayer",
    "SpikingNetwork",
    "Surrogate",
    "TimeGrid",
    "build_network",
    "check_hypergrad_support",
    "quantize",
    "spike",
    "surrogate",
]


@dataclass(frozen=True)
class TimeGrid:
    """The two time steps of dual-timescale training.

    Attributes:
        dt_fine: forward simulation step in seconds (1 us by default, as for device models).
        fine_per_coarse: fine steps per differentiable coarse step; ``dt_coarse = dt_fine *
            fine_per_coarse`` (1000 -> 1 ms by default). ``1`` is full BPTT at the fine step.
        reduce: how a window's fine input and spikes are summarized for the coarse step: ``count``
            (sum; matches the jump-form current of the neurons), ``mean`` (rate, ``count / K``) or
            ``last`` (the last fine step, i.e. plain undersampling). All three agree at ``K = 1``.
    """

    dt_fine: float = 1e-6
    fine_per_coarse: int = 1000
    reduce: str = "count"

    def __post_init__(self) -> None:
        if not self.dt_fine > 0:
            raise ValueError(f"TimeGrid.dt_fine={self.dt_fine!r} must be a positive number of seconds")
        k = self.fine_per_coarse
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"TimeGrid.fine_per_coarse={k!r} must be an integer >= 1 (1 = full BPTT)")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"TimeGrid.reduce={self.reduce!r}: choose one of {list(REDUCTIONS)}")

    @property
    def dt_coarse(self) -> float:
        """Length of one differentiable step in seconds."""
        return self.dt_fine * self.fine_per_coarse

    def summarize(self, block: torch.Tensor) -> torch.Tensor:
        """Reduce a window ``(K, batch, features)`` to ``(batch, features)``."""
        if self.reduce == "count":
            return block.sum(0)
        if self.reduce == "mean":
            return block.mean(0)
        return block[-1]


@dataclass
class _LayerState:
    neuron: State
    out: torch.Tensor  # last window's output summary (differentiable)
    fine_out: torch.Tensor  # last fine step's output (recurrent input of the next fine step)


def _splice(coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """Value of ``fine``, gradient of ``coarse``."""
    return coarse + (fine - coarse).detach()


class SpikingLayer(nn.Module):
    """Quantized synapses into a population of neurons, optionally with recurrent synapses.

    Args:
        synapse: the input synapses (``in -> size``).
        neuron: the neuron population (:class:`LIF`, :class:`FeLIF` or :class:`Readout`).
        recurrent: synapses from the population's own spikes of the previous step, or ``None``.
    """

    def __init__(
        self, synapse: QuantizedLinear, neuron: nn.Module, recurrent: QuantizedLinear | None = None
    ) -> None:
        super().__init__()
        if recurrent is not None and not neuron.spiking:
            raise ValueError("a Readout layer cannot be recurrent: pass recurrent=None")
        self.synapse, self.neuron, self.recurrent = synapse, neuron, recurrent

    def init_state(self, batch: int, like: torch.Tensor) -> _LayerState:
        """Zero neuron state, input current and spikes for ``batch`` samples, like ``like``."""
        zero = like.new_zeros(batch, self.neuron.size)
        return _LayerState(self.neuron.init_state(batch, like), zero, zero)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective (quantized) weights, computed once per sequence and reused by every step."""
        rec = None if self.recurrent is None else self.recurrent.effective_weight()
        return self.synapse.effective_weight(), rec

    def _drive(self, x: torch.Tensor, rec_in: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        drive = self.synapse(x, w[0])
        return drive if self.recurrent is None else drive + self.recurrent(rec_in, w[1])

    def fine_window(
        self, st: _LayerState, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor | None], dt: float
    ) -> tuple[_LayerState, torch.Tensor, torch.Tensor | None]:
        """Run one window's fine steps (callers wrap it in ``no_grad``); ``x`` is ``(K, B, in)``.

        Returns the end state, the outputs ``(K, B, size)`` (spikes, or the readout membrane) and
        the surrogate derivative at every fine step's pre-reset membrane ``(K, B, size)`` (``None``
        for a readout).
        """
        drive = self.synapse(x, w[0])
        neuron, state, prev = self.neuron, st.neuron, st.fine_out
        outs, slopes = [], []
        for t in range(x.shape[0]):
            d = drive[t] if self.recurrent is None else drive[t] + self.recurrent(prev, w[1])
            if not neuron.spiking:
                state, prev = neuron.step(state, d, dt)
                outs.append(prev)
                continue
            state = neuron.integrate(state, d, dt, noise=True)
            dist = neuron.distance(state)
            prev = (dist > 0).to(dist.dtype)
            state = neuron.reset(state, prev)
            outs.append(prev)
            slopes.append(neuron.sur.derivative(dist))
        return _LayerState(state, st.out, prev), torch.stack(outs), torch.stack(slopes) if slopes else None

    def exact_step(
        self, st: _LayerState, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor | None], dt: float
    ) -> _LayerState:
        """One differentiable fine step (``fine_per_coarse = 1``): plain BPTT."""
        state, out = self.neuron.step(st.neuron, self._drive(x, st.out, w), dt)
        return _LayerState(state, out, out)

    def coarse_step(
        self,
        st: _LayerState,
        x: torch.Tensor,
        w: tuple[torch.Tensor, torch.Tensor | None],
        dt: float,
        fine: _LayerState,
        summary: torch.Tensor,
        count: torch.Tensor,
        gain: torch.Tensor | None,
    ) -> _LayerState:
        """One differentiable coarse step of length ``dt`` on the window's summary ``x``, spliced onto
        the fine window's end state ``fine`` and output ``summary``.

        For spiking neurons the output's gradient is ``gain * d(membrane - threshold)``, where ``gain``
        is the window's reduced surrogate derivative along the fine trajectory: each fine spike is
        treated as moving with the coarse membrane. The reset uses the window's spike ``count``.
        """
        drive = self._drive(x, st.out, w)
        if gain is None:
            state, _ = self.neuron.step(st.neuron, drive, dt, noise=False)
            state = tuple(_splice(c, f) for c, f in zip(state, fine.neuron, strict=True))
            return _LayerState(state, state[-1], fine.fine_out)
        state = self.neuron.integrate(st.neuron, drive, dt, noise=False)
        lin = gain * self.neuron.distance(state)
        out = summary + (lin - lin.detach())
        state = self.neuron.reset(state, count)
        state = tuple(_splice(c, f) for c, f in zip(state, fine.neuron, strict=True))
        return _LayerState(state, out, fine.fine_out)


class SpikingNetwork(nn.Module):
    """A stack of :class:`SpikingLayer` trained with dual-timescale BPTT.

    ``forward(x)`` takes input spikes ``(T_fine, batch, features)`` at the fine step and returns the
    last layer's output at the end of every window, ``(T_fine / fine_per_coarse, batch, size)``.
    The grid can be changed between calls (``net.grid = TimeGrid(...)``): it does not affect the
    parameters, only how gradients are taken.
    """

    def __init__(self, layers: Sequence[SpikingLayer], grid: TimeGrid | None = None) -> None:
        super().__init__()
        if not layers:
            raise ValueError("SpikingNetwork needs at least one layer")
        self.layers = nn.ModuleList(layers)
        self.grid = TimeGrid() if grid is None else grid

    def surrogates(self) -> list[Surrogate]:
        """The surrogates of all spiking layers (for :func:`check_hypergrad_support`)."""
        return [layer.neuron.sur for layer in self.layers if layer.neuron.spiking]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Readout of input spikes ``x`` (time, batch, features): fine-step values, coarse-grid gradients."""
        k = self.grid.fine_per_coarse
        if x.dim() != 3 or x.shape[0] % k:
            raise ValueError(
                f"input of shape {tuple(x.shape)}: expected (T_fine, batch, features) with T_fine a multiple of "
                f"fine_per_coarse={k}"
            )
        weights = [layer.weights() for layer in self.layers]
        states = [layer.init_state(x.shape[1], x) for layer in self.layers]
        outputs = []
        for start in range(0, x.shape[0], k):
            states, out = self._window(states, x[start : start + k], weights)
            outputs.append(out)
        return torch.stack(outputs)

    def _window(
        self, states: list[_LayerState], block: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]]
    ) -> tuple[list[_LayerState], torch.Tensor]:
        grid = self.grid
        inp, exact = grid.summarize(block), grid.fine_per_coarse == 1
        fine = []
        if not exact:
            with torch.no_grad():
                x = block
                for layer, st, w in zip(self.layers, states, weights, strict=True):
                    end, x, slopes = layer.fine_window(st, x, w, grid.dt_fine)
                    summary = grid.summarize(x) if layer.neuron.spiking else x[-1]
                    gain = None if slopes is None else grid.summarize(slopes)
                    fine.append((end, summary, x.sum(0), gain))
        new_states = []
        for n, (layer, st, w) in enumerate(zip(self.layers, states, weights, strict=True)):
            if exact:
                st = layer.exact_step(st, inp, w, grid.dt_fine)
            else:
                st = layer.coarse_step(st, inp, w, grid.dt_coarse, *fine[n])
            new_states.append(st)
            inp = st.out
        return new_states, inp


def build_network(
    sizes: Sequence[int],
    neuron: str = "lif",
    recurrent: bool = False,
    bits: int | None = 3,
    grid: TimeGrid | None = None,
    sur: Surrogate | None = None,
    readout_tau: float = 20e-3,
    neuron_kwargs: dict | None = None,
    synapse_kwargs: dict | None = None,
    seed: int = 0,
) -> SpikingNetwork:
    """``sizes = [in, hidden..., out]``: spiking hidden layers and a :class:`Readout` output layer.

    ``neuron`` is ``"lif"`` or ``"felif"``; ``neuron_kwargs`` and ``synapse_kwargs`` go to every
    neuron / synapse (time constants, noise levels, ``w_max``).
    """
    if len(sizes) < 2:
        raise ValueError(f"sizes={list(sizes)!r}: give at least [inputs, outputs]")
    if neuron not in NEURONS:
        raise ValueError(f"neuron={neuron!r}: choose one of {sorted(NEURONS)}")
    nk, sk = dict(neuron_kwargs or {}), dict(synapse_kwargs or {})
    torch.manual_seed(seed)
    layers = []
    for n, (a, b) in enumerate(zip(sizes[:-2], sizes[1:-1], strict=True)):
        cell = NEURONS[neuron](b, sur=sur, seed=seed + n, **nk)
        rec = QuantizedLinear(b, b, bits=bits, seed=seed + 100 + n, **sk) if recurrent else None
        layers.append(SpikingLayer(QuantizedLinear(a, b, bits=bits, seed=seed + n, **sk), cell, rec))
    out_syn = QuantizedLinear(sizes[-2], sizes[-1], bits=bits, seed=seed + 50, **sk)
    layers.append(SpikingLayer(out_syn, Readout(sizes[-1], tau=readout_tau)))
    return SpikingNetwork(layers, grid)
