"""``betty-like`` / ``python -m betty_like``: run an experiment from Hydra configs.

``betty-like experiment=reweight_digits engine.train_iters=500 problem.classifier.hypergrad=cg`` composes
``config.yaml`` of the packaged ``betty_like/configs`` with an experiment, builds every problem from the
experiment's ``build`` section (``_target_`` names the user's own :class:`~betty_like.Problem` subclass,
module, optimizer and data, importable from the current directory) and runs the engine. Experiments of
one's own live in any directory added with ``hydra.searchpath=[file://my_configs]``. ``-m`` sweeps
(``-m problem.classifier.hypergrad=cg,neumann``) give one run directory per value; each holds the
resolved ``config.yaml``, ``logs/`` (CSV, TensorBoard) and ``checkpoints/``.

An experiment has three sections:

- ``build.<problem>``: ``_target_`` (a Problem subclass), ``module``, ``optimizer`` (a
  ``_partial_`` optimizer, called with the module's parameters), optional ``scheduler``
  (``_partial_``, called with the optimizer), ``data``, and any extra keyword arguments of the class;
  or ``build._target_``: one factory that builds every problem (for problems that share modules or
  data), called with its other keys and ``configs``, the ``ProblemConfig`` of each named problem;
- ``problem.<problem>``: its :class:`~betty_like.ProblemConfig` (presets in ``configs/problem/``);
- ``dependencies``: ``u2l`` / ``l2u`` by problem name;
- ``callbacks`` (optional): a list of :class:`~betty_like.callbacks.Callback` objects by ``_target_``.

``ProblemConfig`` and ``EngineConfig`` are registered as structured configs (``problem/schema``,
``engine/schema``), so an unknown key, a wrong type or an unknown method fails at start with
Hydra's message and the valid choices.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import sys
import types
import typing
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from . import config as configs
from .config import EngineConfig, ProblemConfig
from .engine import Engine
from .hypergrad import METHODS

CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")  # package data: in the wheel too
_CHOICES = {
    "hypergrad": list(METHODS),
    "nested": configs.NESTED_RULES,
    "darts_scale": configs.DARTS_SCALES,
    "on_nonfinite": configs.NONFINITE_POLICIES,
    "execution": configs.EXECUTIONS,
}
_PLAIN = (int, float, str, bool)


def _schema_type(name: str, hint: Any) -> Any:
    """The field's type as OmegaConf can check it: an enum for a choice, the type itself if plain, else Any."""
    if name in _CHOICES:
        return enum.Enum(name, {c: c for c in _CHOICES[name]})
    args = typing.get_args(hint)
    if hint in _PLAIN:
        return hint
    if isinstance(hint, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return typing.Optional[inner] if inner in _PLAIN else Any  # noqa: UP045 (OmegaConf reads Optional)
    return Any


def schema(cls: type) -> type:
    """A structured-config twin of the dataclass ``cls``: same fields and defaults, types OmegaConf checks."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        kind = _schema_type(f.name, hints[f.name])
        if f.default_factory is not dataclasses.MISSING:  # e.g. backends={}: a fresh container per config
            fields.append((f.name, kind, dataclasses.field(default_factory=f.default_factory)))
            continue
        default = kind[f.default] if isinstance(kind, type) and issubclass(kind, enum.Enum) else f.default
        fields.append((f.name, kind, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


def register() -> None:
    """Register the structured configs (engine and problem schemas) in Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(group="engine", name="schema", node=schema(EngineConfig))
    store.store(group="problem", name="schema", node=schema(ProblemConfig))


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if isinstance(node, DictConfig) else node


def _problem(name: str, spec: DictConfig, config: ProblemConfig) -> Any:
    """One problem from its ``build.<name>`` section: class, module, optimizer, scheduler, data, extras."""
    parts = {k: v for k, v in spec.items() if k != "_target_"}
    module = instantiate(parts.pop("module"))
    optimizer = instantiate(parts.pop("optimizer"))(module.parameters())
    scheduler = parts.pop("scheduler", None)
    scheduler = instantiate(scheduler)(optimizer) if scheduler is not None else None
    data = instantiate(parts.pop("data", None))
    extra = {k: instantiate(v) for k, v in parts.items()}
    cls = get_class(spec._target_)
    return cls(name, module=module, optimizer=optimizer, scheduler=scheduler, data=data, config=config, **extra)


def _targets(node: Any) -> list[str]:
    """Every ``_target_`` string in a config subtree."""
    if isinstance(node, dict):
        own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def _check_importable(cfg: DictConfig) -> None:
    """Fail before building anything when a ``_target_``'s top-level module cannot be imported from here.

    The packaged experiments name ``examples.<name>``, which lives in the repository, not in the wheel:
    run from elsewhere, Hydra's own error would only say the target could not be located.
    """
    tree = OmegaConf.to_container(cfg, resolve=False)
    for target in _targets([tree.get("build"), tree.get("callbacks")]):
        top = target.split(".")[0]
        if importlib.util.find_spec(top) is not None:
            continue
        fix = (
            "the packaged experiments use the repository's examples/ folder: run betty-like from the repository "
            "root, or point build._target_ at your own module"
            if top == "examples"
            else f"install {top!r} or run from the directory that holds it"
        )
        raise ValueError(f"experiment target {target!r}: module {top!r} is not importable from {Path.cwd()}; {fix}")


def build(cfg: DictConfig) -> Engine:
    """The engine an experiment config describes (see the module docstring)."""
    if "build" not in cfg or not cfg.build:
        raise ValueError("the config has no problems: choose an experiment, e.g. experiment=reweight_digits")
    _check_importable(cfg)
    configs = {name: ProblemConfig(**_plain(spec)) for name, spec in cfg.get("problem", {}).items()}
    if "_target_" in cfg.build:  # one factory builds every problem
        problems = instantiate(cfg.build, _partial_=True)(configs=configs)
    else:
        problems = [_problem(name, spec, configs.get(name, ProblemConfig())) for name, spec in cfg.build.items()]
    callbacks = [instantiate(c) for c in cfg.get("callbacks") or []]
    return Engine(problems, _plain(cfg.get("dependencies")), EngineConfig(**_plain(cfg.engine)), callbacks=callbacks)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    engine = build(cfg)
    engine.run()
    for name in engine.problems:
        status = engine.status(name)
        print(f"{name}: {status.steps} steps, last loss {status.loss}")
    tops = [n for n in engine.problems if not engine.graph.readers(n)]
    return engine.status(tops[0]).loss if tops else None  # what a sweeper (Optuna) minimizes


def main() -> None:
    """Console entry point; the current directory is importable, as under ``python -m``."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    register()
    _main()
