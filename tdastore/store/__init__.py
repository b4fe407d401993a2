"""The gradient store: Zarr rows, Arrow/Parquet metadata, and a manifest that describes both."""

from tdastore.store.gradient_store import GradientStore, open_store

__all__ = ["GradientStore", "open_store"]
