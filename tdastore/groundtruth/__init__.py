"""The further-training gold standard: vectorised replicas, a Ray job pool, and its store."""
