"""The Hydra CLI end to end, as a user runs it: run directory contents, sweeps, config errors, resume."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
TINY = ["engine.train_iters=4", "engine.log_every=2", "engine.checkpoint_every=2", "engine.progress=false"]


def cli(*args: str, entry=(sys.executable, "-m", "betty_like")) -> subprocess.CompletedProcess:
    result = subprocess.run([*entry, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return result


def test_an_experiment_runs_and_its_run_directory_holds_config_logs_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    result = cli("experiment=reweight_digits", *TINY, "problem.classifier.hypergrad=cg", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr
    assert "classifier: 4 steps" in result.stdout and "reweight: 4 steps" in result.stdout
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["problem"]["classifier"]["hypergrad"] == "cg"
    assert config["engine"]["log_dir"] == str(run / "logs")  # resolved, not an interpolation
    with open(run / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["iteration"] for r in rows} == {"2", "4"}
    assert {"classifier/loss", "reweight/loss", "reweight/classifier/solver_residual"} <= {r["tag"] for r in rows}
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000002.pt", "ckpt-00000004.pt"]

    more = cli("experiment=reweight_digits", *TINY, "engine.train_iters=6", "engine.resume=latest",
               "problem.classifier.hypergrad=cg", f"hydra.run.dir={run}")
    assert more.returncode == 0, more.stderr
    assert "classifier: 6 steps" in more.stdout
    assert (run / "checkpoints" / "ckpt-00000006.pt").exists()


EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))
# per experiment, what makes it tiny besides TINY: an upper step within 4 iterations
SMALL = {
    "hyperparameter_optimization": ["problem.classifier.unroll_steps=2"],
    "imaml_sinusoid": ["problem.adapt.unroll_steps=2"],
    "kron_pairs": ["problem.fit.unroll_steps=2"],
    "meta_weight_net": ["build.argv=[--batch_size,20]"],
}


def test_every_example_has_an_experiment():
    experiments = {p.stem for p in (ROOT / "betty_like" / "configs" / "experiment").glob("*.yaml")}
    assert [e for e in EXAMPLES if e not in experiments] == []


@pytest.mark.parametrize("name", [e for e in EXAMPLES if e != "reweight_digits"])  # reweight_digits: the test above
def test_each_example_experiment_runs_end_to_end(tmp_path, name):
    result = cli(f"experiment={name}", *TINY, *SMALL.get(name, []), f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "${" not in (tmp_path / "config.yaml").read_text()  # resolved
    with open(tmp_path / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["iteration"] for r in rows} == {"2", "4"}
    tags = {r["tag"] for r in rows}
    assert {f"{problem}/loss" for problem in config["problem"]} <= tags  # every problem stepped and logged
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "ckpt-00000004.pt").exists()


def test_a_multirun_of_two_values_makes_two_run_directories(tmp_path):
    script = ROOT / ".venv" / "bin" / "betty-like"  # the console script, where make's bootstrap installed it
    entry = (str(script),) if script.exists() else (sys.executable, "-m", "betty_like")
    args = ["-m", "experiment=reweight_digits", *TINY, "problem.classifier.hypergrad=unroll,darts", f"hydra.sweep.dir={tmp_path}"]
    result = cli(*args, entry=entry)
    assert result.returncode == 0, result.stderr
    methods = []
    for sub in ("0", "1"):
        config = yaml.safe_load((tmp_path / sub / "config.yaml").read_text())
        methods.append(config["problem"]["classifier"]["hypergrad"])
        assert (tmp_path / sub / "logs" / "metrics.csv").exists()
        assert (tmp_path / sub / "checkpoints" / "ckpt-00000004.pt").exists()
    assert methods == ["unroll", "darts"]


def test_the_optuna_sweeper_tunes_an_experiment(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = cli("-m", "experiment=reweight_digits_optuna", "engine.train_iters=2", "engine.progress=false",
                 "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"build.classifier.optimizer.lr", "problem.classifier.hypergrad"}
    trials = [yaml.safe_load((tmp_path / sub / "config.yaml").read_text()) for sub in ("0", "1")]
    assert best["best_value"] > 0 and len({t["build"]["classifier"]["optimizer"]["lr"] for t in trials}) == 2


def test_the_submitit_launcher_runs_a_sweep_with_its_local_executor(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = cli("-m", "experiment=reweight_digits_submitit", "engine.train_iters=2", "engine.checkpoint_every=2",
                 "engine.progress=false", "problem.classifier.hypergrad=unroll,cg", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    for sub, method in (("0", "unroll"), ("1", "cg")):
        assert yaml.safe_load((tmp_path / sub / "config.yaml").read_text())["problem"]["classifier"]["hypergrad"] == method
        assert (tmp_path / sub / "checkpoints" / "ckpt-00000002.pt").exists()
        assert (tmp_path / sub / "logs" / "metrics.csv").exists()


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from betty_like.cli import CONFIG_DIR, register

    register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("problem.classifier.hypergrad=nope", "Invalid value 'nope', expected one of [unroll, first_order, darts"),
        ("engine.trian_iters=3", "Key 'trian_iters' not in 'EngineConfigSchema'"),
        ("engine.train_iters=many", "Value 'many' of type 'str' could not be converted to Integer"),
        ("problem.classifier.tol=small", "Value 'small' of type 'str' could not be converted to Float"),
    ],
)
def test_a_config_error_fails_at_composition_with_hydras_message(override, message):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        compose("experiment=reweight_digits", override)
    text = str(info.value) + str(info.value.__cause__)
    assert message in text


def test_without_an_experiment_it_says_to_choose_one():
    from betty_like.cli import build

    with pytest.raises(ValueError, match="choose an experiment, e.g. experiment=reweight_digits"):
        build(compose())


def test_outside_the_repository_a_packaged_experiment_says_where_its_examples_live(tmp_path):
    # the packaged experiments name examples.<name>, which is in the repository, not in the wheel
    result = subprocess.run(
        [sys.executable, "-m", "betty_like", "experiment=reweight_digits", *TINY],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "module 'examples' is not importable" in result.stderr
    assert "run betty-like from the repository root, or point build._target_ at your own module" in result.stderr
