"""Rows of ``benchmarks/vs_peers.py``: betty_like side by side with betty-ml, torchopt and higher.

Each row module measures one comparison; :mod:`peers.common` holds what they share (peer paths,
peak-memory readings, medians, paired ratios). Run them through ``benchmarks/vs_peers.py``.
"""
