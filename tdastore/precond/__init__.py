"""Operators of the unified view, as registered classes (registry.py) on two paths: projected (fitted from the
store's rows, projected/) and exact (on the model in full parameter space, exact/). Importing this package
registers the built-in operator classes."""

from tdastore.precond.exact import diagonal as exact_diagonal
from tdastore.precond.exact import operators as exact_operators
from tdastore.precond.exact import replay as exact_replay
from tdastore.precond.projected import kronecker
from tdastore.precond.projected import operators as projected_operators

__all__ = ["exact_diagonal", "exact_operators", "exact_replay", "kronecker", "projected_operators"]
