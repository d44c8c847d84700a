"""The new examples' claims at small budgets, and their building blocks against plain references.

Hyperparameter optimization: the learned strengths fit the validation split better than the best
global strength of a grid. Implicit MAML: the vmapped task batch equals a loop over tasks, the reset
callback copies theta, and the learned initialization adapts better than the random one. DARTS: the
paper's derivation rule skips the zero operation.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

import darts_digits  # noqa: E402
import hyperparameter_optimization  # noqa: E402
import imaml_sinusoid  # noqa: E402


def test_learned_l2_strengths_fit_validation_better_than_the_best_global_strength():
    result = hyperparameter_optimization.run(outer_steps=20, inner_steps=20, grid_points=5)
    assert result["learned_valid_ce"] < result["grid_valid_ce"]
    assert result["learned_test"][1] > 0.8  # and the classifier is a real one (chance: 0.1)


def test_vmapped_task_batch_equals_a_loop_over_tasks():
    torch.manual_seed(0)
    weights = imaml_sinusoid.TaskWeights(tasks=3)
    with torch.no_grad():
        for p in weights.parameters():
            p.normal_()
    x = torch.randn(3, 5, 1)
    looped = []
    for t in range(3):  # the MLP written out for one task, no vmap
        w = {n: p[t] for n, p in weights.phi.items()}
        h = torch.relu(x[t] @ w["w1"] + w["b1"])
        h = torch.relu(h @ w["w2"] + w["b2"])
        looped.append(h @ w["w3"] + w["b3"])
    torch.testing.assert_close(weights(x), torch.stack(looped), rtol=1e-6, atol=1e-6)


def test_each_meta_batch_starts_at_theta_and_the_learned_initialization_adapts_better():
    made = imaml_sinusoid.problems({}, seed=0, tasks=4, inner_steps=3)
    meta, adapt = made
    engine = imaml_sinusoid.Engine(made, imaml_sinusoid.DEPENDENCIES, imaml_sinusoid.EngineConfig(train_iters=3),
                                   callbacks=[imaml_sinusoid.ResetToTheta(3)])
    reset = engine.callbacks.items[0]
    assert all(bool((phi == 0).all()) for phi in adapt.module.phi.values())  # TaskWeights start at zero
    reset.on_step_start(engine, "adapt")  # adapt has taken 0 steps: a meta-batch starts
    for name, phi in adapt.module.phi.items():
        assert phi.shape[0] == 4 and all(torch.equal(phi[t], meta.module.theta[name].detach()) for t in range(4))
    engine.run(iterations=1)  # one step into the meta-batch: no reset before the next step
    moved = {n: phi.detach().clone() for n, phi in adapt.module.phi.items()}
    reset.on_step_start(engine, "adapt")
    assert all(torch.equal(adapt.module.phi[n], moved[n]) for n in moved)

    result = imaml_sinusoid.run(meta_steps=80, inner_steps=10, test_tasks=100)
    assert result["meta_init_mse"] < 0.9 * result["random_init_mse"]


def test_darts_derivation_skips_the_zero_operation():
    alpha = torch.zeros(2, len(darts_digits.OPS))
    alpha[0, darts_digits.OPS.index("zero")] = 5.0
    alpha[0, darts_digits.OPS.index("conv5x5")] = 1.0
    alpha[1, darts_digits.OPS.index("identity")] = 2.0
    assert darts_digits.derived(alpha) == ["conv5x5", "identity"]
