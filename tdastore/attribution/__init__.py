"""Attribution: the one façade (Attributor) that answers top-k, bottom-k and full score rows for test inputs."""

from tdastore.attribution.attributor import Attributor, store_config

__all__ = ["Attributor", "store_config"]
