"""The demo's claim, at a small budget: learned weights separate corrupted labels and help accuracy."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

from reweight_digits import noisy_digits, run  # noqa: E402


def test_noisy_split_flips_the_requested_fraction_to_wrong_classes():
    (x, y, flipped), (xv, yv), (xt, yt) = noisy_digits(noise=0.4, seed=0)
    assert len(xv) == 100 and len(xt) == 500 and len(x) == 1797 - 600
    assert flipped.float().mean() == pytest.approx(0.4, abs=0.04)
    clean_train_y = noisy_digits(noise=0.0, seed=0)[0][1]
    assert (y[flipped] != clean_train_y[flipped]).all() and (y[~flipped] == clean_train_y[~flipped]).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_reweighting_downweights_corrupted_examples_and_beats_plain_training(seed):
    result = run(steps=400, seed=seed)
    assert result["weight_corrupted"] < 0.25 * result["weight_clean"]
    assert result["reweighted_accuracy"] > result["plain_accuracy"]
