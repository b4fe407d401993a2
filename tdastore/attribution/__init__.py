"""Attribution: the one façade (Attributor) that answers top-k, bottom-k and full score rows for test inputs."""

from tdastore.attribution.attributor import Attributor, store_config
from tdastore.store.gradient_store import GradientStore

GradientStore.attributor_class = Attributor  # store.attributor(method): the store layer cannot import upward

__all__ = ["Attributor", "store_config"]
