"""Closed-form multilevel problems with exact hypergradients, for tests, benchmarks and users' own checks."""

from .closed_form import Bilevel, chain, ridge, sample_weights

__all__ = ["Bilevel", "chain", "ridge", "sample_weights"]
