"""Operators of the unified view: projected (fitted from the store) and exact (on the model)."""
