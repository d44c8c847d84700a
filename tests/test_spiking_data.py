"""Offline task data for the spiking backend: music21 chorales and generated Braille events."""

import pytest
import torch

from betty_like.data import braille, chorales


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        parsed = chorales.load_chorales(limit=6)
        cached = chorales.load_chorales(limit=6)
        assert list(cache.glob("betty_like/chorales_6_*.pt"))
    for a, b in zip(parsed, cached, strict=True):
        assert a.name == b.name and torch.equal(a.frames, b.frames) and torch.equal(a.soprano, b.soprano)
    return parsed


def test_chorale_frames_are_four_voice_multi_hot_with_soprano_on_top(pieces):
    for p in pieces:
        voices = p.frames.sum(1)
        assert (voices <= 4).float().mean() > 0.95 and (voices >= 3).float().mean() > 0.9
        sounding = p.soprano < p.frames.shape[1]
        top = torch.tensor([int(row.nonzero().max()) if row.any() else -1 for row in p.frames])
        assert (top[sounding] == p.soprano[sounding]).float().mean() > 0.95


def test_chorale_split_is_by_whole_piece_in_corpus_order(pieces):
    train, valid, test = chorales.split_by_piece(pieces, (0.5, 0.2))
    assert [p.name for p in train + valid + test] == [p.name for p in pieces]
    assert len(train) == 3 and len(valid) == 1 and len(test) == 2
    with pytest.raises(ValueError, match="fractions"):
        chorales.split_by_piece(pieces, (0.9, 0.2))


def test_segments_target_the_next_frame_and_spikes_follow_frames(pieces):
    x, y = chorales.segments(pieces[:1], 16)
    p = pieces[0]
    assert torch.equal(x[1], p.frames[16:32].float()) and torch.equal(y[1], p.soprano[17:33])
    spikes = chorales.to_spikes(x, steps_per_frame=10, rate=0.5, generator=torch.Generator().manual_seed(0))
    assert spikes.shape == (16 * 10, x.shape[0], x.shape[2])
    held = x.transpose(0, 1).repeat_interleave(10, dim=0)
    assert spikes[held == 0].sum() == 0 and 0.45 < spikes[held == 1].mean() < 0.55
    with pytest.raises(ValueError, match="shorter segments"):
        chorales.segments(pieces[:1], 10_000)


def test_braille_dataset_shape_classes_and_determinism():
    cfg = braille.BrailleConfig(steps=64)
    x, y = braille.make_dataset(2, cfg, seed=1)
    assert x.shape == (54, 64, braille.CHANNELS) and torch.equal(y, torch.arange(27).repeat_interleave(2))
    assert set(torch.unique(x).tolist()) <= {0.0, 1.0}
    assert torch.equal(x, braille.make_dataset(2, cfg, seed=1)[0])
    assert not torch.equal(x, braille.make_dataset(2, cfg, seed=2)[0])


def test_braille_clean_sweep_gives_balanced_on_off_events_per_dot():
    clean = braille.BrailleConfig(
        steps=400, pressure_noise=0, speed_jitter=0, offset_jitter=0, time_jitter=0, background=0
    )
    gen = torch.Generator().manual_seed(0)
    assert braille.sample(" ", clean, gen).sum() == 0
    one, six = braille.sample("a", clean, gen), braille.sample("y", clean, gen)
    half = braille.CHANNELS // 2
    assert one[:, :half].sum() > 0 and abs(one[:, :half].sum() - one[:, half:].sum()) <= half
    assert six.sum() > 2 * one.sum()
    with pytest.raises(ValueError, match="letter"):
        braille.sample("A", clean, gen)
