"""The package version, in a module of its own so every layer can record it without importing the package root."""

__version__ = "0.1.0"
"""tdastore's version (PEP 440), recorded in every store's manifest and printed by `tdastore --version`."""
