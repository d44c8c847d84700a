"""Generated Braille reading data: a 6-dot cell swept over a tactile sensor array, as ON/OFF events.

The public Braille reading set (27 classes: space and a-z; 12 taxels with ON/OFF events) is a
download, so this generator makes data of the same shape offline. Per sample:

1. The letter's raised dots (standard 6-dot Braille; 2 columns x 3 rows, 2.5 mm apart) slide
   horizontally across a 3 x 4 grid of taxels (2.5 mm rows, 2 mm columns) at a speed that varies by
   ``speed_jitter`` per sample, with a vertical misalignment of up to ``offset_jitter`` mm.
2. Each taxel reads the pressure ``sum_dots exp(-d^2 / (2 sigma^2))`` plus Gaussian noise
   (``pressure_noise``) at every fine step.
3. Sigma-delta encoding turns pressure into events: an ON (OFF) event whenever the pressure rose
   (fell) by ``delta`` since the last event of that taxel, so 24 channels (12 ON, 12 OFF).
4. Every event is moved by a random integer of up to ``time_jitter`` steps, and background events
   appear with probability ``background`` per channel and step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LETTERS = " abcdefghijklmnopqrstuvwxyz"
_DOTS = {
    "a": "1", "b": "12", "c": "14", "d": "145", "e": "15", "f": "124", "g": "1245", "h": "125",
    "i": "24", "j": "245", "k": "13", "l": "123", "m": "134", "n": "1345", "o": "135", "p": "1234",
    "q": "12345", "r": "1235", "s": "234", "t": "2345", "u": "136", "v": "1236", "w": "2456",
    "x": "1346", "y": "13456", "z": "1356", " ": "",
}  # fmt: skip
TAXEL_ROWS, TAXEL_COLS = 3, 4
CHANNELS = 2 * TAXEL_ROWS * TAXEL_COLS


@dataclass(frozen=True)
class BrailleConfig:
    """Generator settings (lengths in mm, times in fine steps). Defaults give a learnable but noisy task."""

    steps: int = 256
    sigma: float = 1.0
    delta: float = 0.15
    pressure_noise: float = 0.05
    speed_jitter: float = 0.2
    offset_jitter: float = 0.8
    time_jitter: int = 4
    background: float = 0.005

    def __post_init__(self) -> None:
        if self.steps < 8 or self.sigma <= 0 or self.delta <= 0:
            raise ValueError(f"BrailleConfig needs steps >= 8, sigma > 0 and delta > 0, got {self}")
        if self.time_jitter < 0 or not 0 <= self.background < 1:
            raise ValueError(f"BrailleConfig needs time_jitter >= 0 and background in [0, 1), got {self}")


def _dot_positions(letter: str) -> torch.Tensor:
    """(n_dots, 2) positions (x, y) in mm of the raised dots of ``letter``."""
    pos = [((int(d) - 1) // 3 * 2.5, (int(d) - 1) % 3 * 2.5) for d in _DOTS[letter]]
    return torch.tensor(pos, dtype=torch.float32).reshape(-1, 2)


def _events(pressure: torch.Tensor, delta: float) -> torch.Tensor:
    """Sigma-delta encode ``(..., T, taxels)`` pressure to ``(..., T, 2 * taxels)`` ON/OFF events."""
    ref = pressure[..., 0, :].clone()
    on, off = torch.zeros_like(pressure), torch.zeros_like(pressure)
    for t in range(1, pressure.shape[-2]):
        now = pressure[..., t, :]
        up, down = now - ref >= delta, ref - now >= delta
        on[..., t, :], off[..., t, :] = up.float(), down.float()
        ref = torch.where(up | down, now, ref)
    return torch.cat([on, off], dim=-1)


def _jitter(events: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    if shift == 0:
        return events
    out = torch.zeros_like(events)
    t, c = events.nonzero(as_tuple=True)
    moved = (t + torch.randint(-shift, shift + 1, t.shape, generator=generator)).clamp(0, events.shape[0] - 1)
    out[moved, c] = 1.0
    return out


def _pressure(letter: str, cfg: BrailleConfig, generator: torch.Generator) -> torch.Tensor:
    """Noisy taxel pressure ``(steps, 12)`` for one sweep of ``letter`` over the sensor."""
    speed = 1.0 + cfg.speed_jitter * (2 * torch.rand((), generator=generator) - 1)
    offset = cfg.offset_jitter * (2 * torch.rand((), generator=generator) - 1)
    ty, tx = torch.meshgrid(torch.arange(TAXEL_ROWS) * 2.5, torch.arange(TAXEL_COLS) * 2.0, indexing="ij")
    taxels = torch.stack([tx.flatten(), ty.flatten()], dim=1)  # (12, 2)
    time = torch.linspace(0, 1, cfg.steps)
    start, travel = -4.0, 4.0 + 6.0 + 2.5 + 4.0  # the cell enters from the left and leaves on the right
    shift = start + travel * speed * time  # (T,)
    pressure = torch.zeros(cfg.steps, taxels.shape[0])
    for x, y in _dot_positions(letter).tolist():
        dx = (x + shift)[:, None] - taxels[None, :, 0]
        dy = (y + offset) - taxels[None, :, 1]
        pressure += torch.exp(-(dx**2 + dy**2) / (2 * cfg.sigma**2))
    return pressure + cfg.pressure_noise * torch.randn(pressure.shape, generator=generator)


def _finish(events: torch.Tensor, cfg: BrailleConfig, generator: torch.Generator) -> torch.Tensor:
    """Timing jitter and background events for one sample's ``(steps, 24)`` events."""
    events = _jitter(events, cfg.time_jitter, generator)
    noise = (torch.rand(events.shape, generator=generator) < cfg.background).float()
    return torch.clamp(events + noise, max=1.0)


def sample(letter: str, config: BrailleConfig, generator: torch.Generator) -> torch.Tensor:
    """Events ``(steps, 24)`` for one sweep of ``letter`` over the sensor."""
    if letter not in _DOTS:
        raise ValueError(f"letter={letter!r}: choose one of {LETTERS!r}")
    return _finish(_events(_pressure(letter, config, generator), config.delta), config, generator)


def make_dataset(
    per_letter: int, config: BrailleConfig | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_letter`` sweeps of each of the 27 classes: events ``(N, steps, 24)``, labels ``(N,)``."""
    if per_letter < 1:
        raise ValueError(f"per_letter={per_letter!r} must be >= 1")
    cfg = BrailleConfig() if config is None else config
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(LETTERS)).repeat_interleave(per_letter)
    pressure = torch.stack([_pressure(LETTERS[int(c)], cfg, gen) for c in labels])
    events = _events(pressure, cfg.delta)
    return torch.stack([_finish(e, cfg, gen) for e in events]), labels
