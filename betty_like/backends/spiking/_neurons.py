"""Neuron models with an explicit time step: LIF, a ferroelectric-style FeLIF stand-in, a readout.

Every neuron maps ``(state, drive, dt) -> (state, output)`` for one step of length ``dt`` seconds,
where ``drive`` is the synaptic input of that step. Decay factors are ``exp(-dt / tau)``, so the
same update is stable and meaningful at the fine step and at the coarse step, which is what lets
the dual-timescale trainer take one coarse step in place of many fine ones. Neuron parameters
(threshold, time constants) are per-neuron ``nn.Parameter`` so a level above can learn them.

Noise: device-to-device variability (``d2d_sigma``) is a relative error of the threshold drawn once
per neuron; cycle-to-cycle noise (``c2c_sigma``) is added to the membrane state on every step
with ``noise=True``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ._surrogate import Surrogate, spike, surrogate

State = tuple[torch.Tensor, ...]


def _membrane_noise(v: torch.Tensor, sigma: float, noise: bool) -> torch.Tensor:
    """``v + sigma * N(0, 1)`` elementwise when ``noise`` is on and ``sigma > 0``, else ``v`` unchanged."""
    return v + sigma * torch.randn_like(v) if noise and sigma > 0 else v


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name}={value!r} must be positive")


class Neuron(nn.Module, ABC):
    """Common parts: synaptic current with time constant ``tau_syn``, threshold, noise, surrogate."""

    spiking = True

    def __init__(
        self,
        size: int,
        threshold: float,
        tau_syn: float,
        sur: Surrogate | None,
        d2d_sigma: float,
        c2c_sigma: float,
        seed: int,
    ) -> None:
        super().__init__()
        _check_positive(tau_syn=tau_syn)
        if d2d_sigma < 0 or c2c_sigma < 0:
            raise ValueError(f"noise levels must be >= 0, got d2d_sigma={d2d_sigma}, c2c_sigma={c2c_sigma}")
        self.size = size
        self.sur = surrogate() if sur is None else sur
        self.c2c_sigma = c2c_sigma
        self.threshold = nn.Parameter(torch.full((size,), float(threshold)))
        self.log_tau_syn = nn.Parameter(torch.full((size,), float(tau_syn)).log())
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("d2d", 1.0 + d2d_sigma * torch.randn(size, generator=gen))

    @property
    def first_order_only(self) -> bool:
        """True when the surrogate has no usable second derivative: the engine then refuses
        hypergradient methods that differentiate through gradients of this neuron."""
        return not self.sur.second_order

    def init_state(self, batch: int, like: torch.Tensor) -> State:
        """Zero state for ``batch`` samples, on ``like``'s device and dtype."""
        zero = like.new_zeros(batch, self.size)
        return (zero, zero)

    def _current(self, i: torch.Tensor, drive: torch.Tensor, dt: float) -> torch.Tensor:
        return torch.exp(-dt / self.log_tau_syn.exp()) * i + drive

    def _noise(self, v: torch.Tensor, noise: bool) -> torch.Tensor:
        return _membrane_noise(v, self.c2c_sigma, noise)

    def distance(self, state: State) -> torch.Tensor:
        """Signed distance of the membrane (last state entry) from the threshold, before reset."""
        return state[-1] - self.threshold * self.d2d

    def step(self, state: State, drive: torch.Tensor, dt: float, noise: bool = True) -> tuple[State, torch.Tensor]:
        """One step of length ``dt``: integrate, fire, reset; returns the new state and the spikes."""
        state = self.integrate(state, drive, dt, noise)
        s = spike(self.distance(state), self.sur)
        return self.reset(state, s.detach()), s

    @abstractmethod
    def integrate(self, state: State, drive: torch.Tensor, dt: float, noise: bool) -> State:
        """The state after one step, before any spike resets it."""

    @abstractmethod
    def reset(self, state: State, fired: torch.Tensor) -> State:
        """The state after ``fired`` (a detached spike, or a window's spike count) reset it."""


class LIF(Neuron):
    """Current-based leaky integrate-and-fire neuron.

    ``i <- exp(-dt/tau_syn) i + drive``; ``u <- b u + (1 - b) i`` with ``b = exp(-dt/tau_mem)``;
    spike ``s = H(u - threshold)``; reset ``u <- u - threshold * s`` (``subtract``) or
    ``u <- u (1 - s)`` (``zero``), with ``s`` detached in the reset as is usual for surrogate training.
    """

    def __init__(
        self,
        size: int,
        tau_mem: float = 20e-3,
        tau_syn: float = 5e-3,
        threshold: float = 1.0,
        reset: str = "subtract",
        sur: Surrogate | None = None,
        d2d_sigma: float = 0.0,
        c2c_sigma: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(size, threshold, tau_syn, sur, d2d_sigma, c2c_sigma, seed)
        _check_positive(tau_mem=tau_mem)
        if reset not in ("subtract", "zero"):
            raise ValueError(f"reset={reset!r}: choose 'subtract' or 'zero'")
        self.reset_mode = reset
        self.log_tau_mem = nn.Parameter(torch.full((size,), float(tau_mem)).log())

    def integrate(self, state: State, drive: torch.Tensor, dt: float, noise: bool) -> State:
        i, u = state
        i = self._current(i, drive, dt)
        b = torch.exp(-dt / self.log_tau_mem.exp())
        return i, self._noise(b * u + (1.0 - b) * i, noise)

    def reset(self, state: State, fired: torch.Tensor) -> State:
        i, u = state
        if self.reset_mode == "subtract":
            return i, u - self.threshold * self.d2d * fired
        return i, u * (1.0 - fired.clamp(max=1.0))


class FeLIF(Neuron):
    """Ferroelectric-style LIF: the membrane is a polarization ``P`` with hysteretic switching.

    This device model is a documented **stand-in**, not the BRUNO paper's compact model. The synaptic
    current ``i`` acts as the voltage across a ferroelectric capacitor whose polarization follows two
    tanh-shaped branches, ``P_up(i) = P_s tanh((i - E_c)/w)`` (rising) and
    ``P_down(i) = P_s tanh((i + E_c)/w)`` (falling). Between them ``P`` holds its value (hysteresis);
    outside it relaxes towards the nearer branch with switching time constant ``tau_sw``:

    ``P <- P + g (relu(P_up - P) - relu(P - P_down))`` with ``g = 1 - exp(-dt/tau_sw)``,

    then retention loss relaxes ``P`` towards the erased state ``-P_s`` with ``tau_leak``. The neuron
    fires when ``P`` crosses ``threshold`` and an erase pulse resets ``P`` to ``-P_s``.

    Args:
        p_sat: saturation polarization ``P_s`` (normalized units).
        e_coercive: coercive drive ``E_c``: a current below it cannot switch the device up.
        width: switching width ``w`` of the tanh branches.
        tau_sw, tau_leak: switching and retention time constants in seconds.
    """

    def __init__(
        self,
        size: int,
        tau_syn: float = 5e-3,
        tau_sw: float = 10e-3,
        tau_leak: float = 50e-3,
        p_sat: float = 1.0,
        e_coercive: float = 0.5,
        width: float = 0.25,
        threshold: float = 0.5,
        sur: Surrogate | None = None,
        d2d_sigma: float = 0.0,
        c2c_sigma: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(size, threshold, tau_syn, sur, d2d_sigma, c2c_sigma, seed)
        _check_positive(tau_sw=tau_sw, tau_leak=tau_leak, p_sat=p_sat, e_coercive=e_coercive, width=width)
        if not -p_sat < threshold < p_sat:
            raise ValueError(f"threshold={threshold!r} must lie inside (-p_sat, p_sat) = ({-p_sat}, {p_sat})")
        self.p_sat, self.e_coercive, self.width = p_sat, e_coercive, width
        self.log_tau_sw = nn.Parameter(torch.full((size,), float(tau_sw)).log())
        self.log_tau_leak = nn.Parameter(torch.full((size,), float(tau_leak)).log())

    def init_state(self, batch: int, like: torch.Tensor) -> State:
        """Zero current, fully erased polarization ``-P_s``."""
        zero = like.new_zeros(batch, self.size)
        return (zero, zero - self.p_sat)

    def integrate(self, state: State, drive: torch.Tensor, dt: float, noise: bool) -> State:
        i, p = state
        i = self._current(i, drive, dt)
        up = self.p_sat * torch.tanh((i - self.e_coercive) / self.width)
        down = self.p_sat * torch.tanh((i + self.e_coercive) / self.width)
        g = 1.0 - torch.exp(-dt / self.log_tau_sw.exp())
        p = p + g * (torch.relu(up - p) - torch.relu(p - down))
        keep = torch.exp(-dt / self.log_tau_leak.exp())
        return i, self._noise(-self.p_sat + keep * (p + self.p_sat), noise)

    def reset(self, state: State, fired: torch.Tensor) -> State:
        i, p = state
        return i, p - fired.clamp(max=1.0) * (p + self.p_sat)


class Readout(nn.Module):
    """Non-spiking leaky integrator read out as the network's output (logits).

    ``u <- b u + drive`` with ``b = exp(-dt/tau)``: the input enters as a jump, so a window's spike
    count drives the coarse step like the sum of its fine steps. ``c2c_sigma`` is the membrane's
    cycle-to-cycle noise, as for the spiking neurons: ``sigma * N(0, 1)`` added to ``u`` on every step
    taken with ``noise=True`` (it stays in the membrane and decays with it); 0, the default, makes the
    readout an ideal integrator.
    """

    spiking = False

    def __init__(self, size: int, tau: float = 20e-3, c2c_sigma: float = 0.0) -> None:
        super().__init__()
        _check_positive(tau=tau)
        if c2c_sigma < 0:
            raise ValueError(f"Readout noise level must be >= 0, got c2c_sigma={c2c_sigma} (0 disables it)")
        self.size = size
        self.c2c_sigma = c2c_sigma
        self.log_tau = nn.Parameter(torch.full((size,), float(tau)).log())

    def init_state(self, batch: int, like: torch.Tensor) -> State:
        """Zero membrane."""
        return (like.new_zeros(batch, self.size),)

    def step(self, state: State, drive: torch.Tensor, dt: float, noise: bool = True) -> tuple[State, torch.Tensor]:
        """One step; the output is the membrane itself, with its noise when ``noise`` is on."""
        u = _membrane_noise(torch.exp(-dt / self.log_tau.exp()) * state[0] + drive, self.c2c_sigma, noise)
        return (u,), u


NEURONS = {"lif": LIF, "felif": FeLIF}
