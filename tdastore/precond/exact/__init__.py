"""The exact path: operators on the model in its full parameter space (CG, LiSSA, DataInf, EK-FAC)."""
