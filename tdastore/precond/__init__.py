"""Operators of the unified view, as registered classes (registry.py) on two paths: projected (fitted from the
store's rows, projected/) and exact (on the model in full parameter space, exact/)."""
