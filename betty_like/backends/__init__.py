"""Operator backends that plug in underneath any problem's model (see docs/backends)."""
