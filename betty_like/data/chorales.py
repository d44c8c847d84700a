"""Bach chorale next-note prediction from the chorales that ``music21`` ships (no network).

Each chorale becomes a sequence of frames of ``frame_ql`` quarter notes (8th notes by default);
a frame is a multi-hot vector over MIDI pitches ``low..high`` (all four voices) and its target is
the soprano pitch of the *next* frame, as a class ``0..n_pitches-1`` or ``n_pitches`` for a rest.
Pieces are split in the corpus' own order (Riemenschneider numbering), whole pieces per split, so
no piece leaks between train, validation and test.

Parsing a score takes ~0.15 s, so by default only the first ``limit=120`` chorales are used, and
the parsed arrays are cached under ``$XDG_CACHE_HOME/betty_like`` (``~/.cache/betty_like``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Chorale:
    """One piece: ``frames`` ``(T, n_pitches)`` multi-hot, ``soprano`` ``(T,)`` class per frame."""

    name: str
    frames: torch.Tensor
    soprano: torch.Tensor


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "betty_like"


def _encode(score, frame_ql: float, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_frames = int(round(float(score.highestTime) / frame_ql))
    rest = high - low + 1
    frames = torch.zeros(n_frames, rest, dtype=torch.bool)
    soprano = torch.full((n_frames,), rest, dtype=torch.long)
    for voice, part in enumerate(score.parts):
        for note in part.flatten().notes:
            first = int(round(float(note.offset) / frame_ql))
            last = max(first + 1, int(round(float(note.offset + note.quarterLength) / frame_ql)))
            for pitch in note.pitches:
                if low <= pitch.midi <= high:
                    frames[first:last, pitch.midi - low] = True
                    if voice == 0:
                        soprano[first:last] = pitch.midi - low
    return frames, soprano


def load_chorales(
    limit: int | None = 120,
    frame_ql: float = 0.5,
    low: int = 36,
    high: int = 84,
    cache: bool = True,
) -> list[Chorale]:
    """Parse (or load from cache) the first ``limit`` Bach chorales (``None`` = all 371).

    Args:
        limit: how many chorales, in corpus order.
        frame_ql: frame length in quarter notes (0.5 = 8th notes, 0.25 = 16th notes).
        low, high: MIDI range of the pitch vector; notes outside it are dropped.
        cache: read and write the parsed arrays under the user cache directory.
    """
    from music21 import corpus

    if limit is not None and limit < 3:
        raise ValueError(f"limit={limit!r}: need at least 3 chorales (one per split)")
    if not frame_ql > 0 or not low < high:
        raise ValueError(f"need frame_ql > 0 and low < high, got frame_ql={frame_ql}, low={low}, high={high}")
    names = [str(n) for n in corpus.chorales.Iterator(returnType="filename")]
    names = names if limit is None else names[:limit]
    path = _cache_dir() / f"chorales_{len(names)}_{frame_ql}_{low}_{high}.pt"
    if cache and path.exists():
        stored = torch.load(path, weights_only=True)
        return [
            Chorale(n, f, s)
            for n, f, s in zip(stored["names"], stored["frames"], stored["soprano"], strict=True)
        ]
    pieces = []
    for name in names:
        frames, soprano = _encode(corpus.parse(name), frame_ql, low, high)
        pieces.append(Chorale(name, frames, soprano))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "names": [p.name for p in pieces],
                "frames": [p.frames for p in pieces],
                "soprano": [p.soprano for p in pieces],
            },
            tmp,
        )
        tmp.replace(path)
    return pieces


def split_by_piece(
    pieces: list[Chorale], fractions: tuple[float, float] = (0.8, 0.1)
) -> tuple[list[Chorale], list[Chorale], list[Chorale]]:
    """Train / validation / test by whole pieces in corpus order; ``fractions`` = (train, validation)."""
    train_f, valid_f = fractions
    if not (train_f > 0 and valid_f > 0 and train_f + valid_f < 1):
        raise ValueError(f"fractions={fractions!r}: need two positive fractions summing to less than 1")
    n = len(pieces)
    a = max(1, int(round(train_f * n)))
    b = min(n - 1, a + max(1, int(round(valid_f * n))))
    return pieces[:a], pieces[a:b], pieces[b:]


def segments(pieces: list[Chorale], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut every piece into non-overlapping segments of ``length`` frames with next-frame targets.

    Returns inputs ``(N, length, n_pitches)`` float and targets ``(N, length)``: the soprano class of
    the frame after each input frame. Tails shorter than ``length`` are dropped.
    """
    xs, ys = [], []
    for p in pieces:
        for start in range(0, p.frames.shape[0] - length, length):
            xs.append(p.frames[start : start + length])
            ys.append(p.soprano[start + 1 : start + length + 1])
    if not xs:
        raise ValueError(f"no piece is longer than length={length} frames: use shorter segments")
    return torch.stack(xs).float(), torch.stack(ys)


def to_spikes(frames: torch.Tensor, steps_per_frame: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Rate-code frames ``(N, L, P)`` as spikes ``(L * steps_per_frame, N, P)`` at the fine step.

    An active pitch fires with probability ``rate`` at each fine step of its frame (Bernoulli).
    """
    if not 0 < rate <= 1:
        raise ValueError(f"rate={rate!r} must lie in (0, 1]")
    held = frames.transpose(0, 1).repeat_interleave(steps_per_frame, dim=0)
    return (torch.rand(held.shape, generator=generator) < rate * held).float()
