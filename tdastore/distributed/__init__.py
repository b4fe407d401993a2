"""Ray is the only distribution engine: the store build (and later the ground-truth pool) run here."""
