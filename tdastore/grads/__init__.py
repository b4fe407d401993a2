"""Per-example gradients and their random projections."""

from tdastore.grads.per_example import PerExampleGradients, select_parameters
from tdastore.grads.projection import Projector, make_projector

__all__ = ["PerExampleGradients", "select_parameters", "Projector", "make_projector"]
