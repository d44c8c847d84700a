"""Betty's Meta-Weight-Net and Learning-by-Ignoring examples, ported to digits, at a small budget.

Each example is run through its ``main(argv)`` with Betty's dependency graph as written. The
Learning-by-Ignoring graph has ``l2u`` edges without ``u2l`` partners (pretrain -> finetune,
finetune -> reweight), so those tests need an engine that accepts them and takes ``reweight``'s
hypergradient as the total derivative through both paths to ``pretrain``.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

import learning_by_ignoring  # noqa: E402
import meta_weight_net  # noqa: E402

CHANCE = 0.1  # ten balanced digit classes


def _finite(result, *keys):
    return all(math.isfinite(result[k]) for k in keys)


# --------------------------------------------------------------------------- data splits (no engine involved)
def test_meta_weight_net_splits_follow_betty_build_dataloader():
    (x, y, y_true), (xm, ym), (xt, yt), counts = meta_weight_net.meta_weight_digits(
        seed=0, num_meta=100, imbalanced_factor=10, corruption_type="uniform", corruption_ratio=0.4
    )
    assert torch.bincount(ym, minlength=10).tolist() == [10] * 10  # the meta set is class-balanced and clean
    assert len(yt) == 500 and len(y) == sum(counts) == len(x)
    assert max(counts) / min(counts) == pytest.approx(10, rel=0.25)
    # uniform corruption keeps a label with 1 - 0.4 + 0.4 / 10
    assert float((y == y_true).float().mean()) == pytest.approx(0.64, abs=0.07)
    flip = meta_weight_net.corruption_matrix("flip2", 0.4, np.random.default_rng(0))
    assert flip.sum(1) == pytest.approx([1.0] * 10) and (flip.diagonal() == 0.6).all()


def test_learning_by_ignoring_splits():
    (xs, ys, harmful), (xt, yt), (xv, yv), (xe, ye) = learning_by_ignoring.lbi_digits(
        seed=0, source_noise=0.5, shift="noise", target_size=50, valid_size=100, test_size=400
    )
    assert (len(yt), len(yv), len(ye), len(ys)) == (50, 100, 400, 1797 - 550)
    assert float(harmful.float().mean()) == pytest.approx(0.5, abs=0.05)
    clean = learning_by_ignoring.lbi_digits(0, 0.0, "noise", 50, 100, 400)[0][1]
    assert (ys[harmful] != clean[harmful]).all() and (ys[~harmful] == clean[~harmful]).all()
    batch = next(learning_by_ignoring.indexed_batches(xs, ys, 64, seed=0))
    assert torch.equal(batch[1], ys[batch[2]])  # the index names the example, for its ignoring weight


# --------------------------------------------------------------------------- Meta-Weight-Net (runs on today's engine)
@pytest.mark.parametrize("method", ["darts", "cg"])
def test_meta_weight_net_trains_the_weight_net_through_the_classifier(method):
    result = meta_weight_net.main(["--iters", "100", "--method", method, "--valid_points", "2"])
    assert _finite(result, "inner_loss_first", "inner_loss_last", "outer_loss_first", "outer_loss_last")
    assert result["outer_steps"] == 100  # unroll_steps=1: one outer step per inner step, as in Betty
    assert result["weight_net_change"] > 1e-3
    assert (
        result["outer_loss_last"] < result["outer_loss_first"]
    )  # clean meta loss falls as the classifier learns
    assert result["mwn_accuracy"] > 5 * CHANCE and result["plain_accuracy"] > 5 * CHANCE


# --------------------------------------------------------------------------- Learning by Ignoring (needs the new engine)
@pytest.mark.parametrize("method", ["darts", "cg"])
def test_learning_by_ignoring_learns_to_ignore_corrupted_source_examples(method):
    result = learning_by_ignoring.main(["--iters", "150", "--method", method, "--valid_points", "2"])
    losses = [f"{p}_loss_{end}" for p in ("pretrain", "finetune", "reweight") for end in ("first", "last")]
    assert _finite(result, *losses)
    assert result["reweight_steps"] == 150  # the upper problem stepped every iteration
    assert result["logit_change"] > 1e-3
    assert result["reweight_loss_last"] < result["reweight_loss_first"]
    assert result["weight_clean"] > result["weight_harmful"] + 0.05
    assert result["lbi_accuracy"] > 5 * CHANCE
