"""How well each method approximates the further-training gold standard."""
