"""betty_like: multilevel optimization for PyTorch with exact hypergradients.

Users subclass :class:`Problem` for each level, wire the problems into a dependency graph and hand
them to an :class:`Engine`, which schedules the steps and computes hypergradients through the
levels. :func:`check_hypergradient` compares any method with a reference on the user's own setup.
"""

from .check import HypergradReport, check_hypergradient
from .config import EngineConfig, ProblemConfig
from .engine import Engine
from .hypergrad import METHODS
from .optim import supported_optimizers
from .problem import Problem

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Engine",
    "EngineConfig",
    "HypergradReport",
    "Problem",
    "ProblemConfig",
    "check_hypergradient",
    "supported_optimizers",
]
