"""betty_like: multilevel optimization for PyTorch with exact hypergradients."""

__version__ = "0.1.0"
