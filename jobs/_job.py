"""Shared by the job entry points: parse --config, make the package importable, report what was done.

Run on a cluster with
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/<name>.py --config configs/<x>.yaml
The working directory (this repository) is uploaded; `tdastore` is imported from it, and every Ray worker
receives the package through the job's runtime_env (see tdastore.distributed.ray_session).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the uploaded working directory holds the package
    sys.path.insert(0, str(ROOT))


def parse(description: str, extra=None):
    import tdastore

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, set by `ray job submit`)")
    if extra:
        extra(parser)
    args = parser.parse_args()
    return tdastore.load_config(args.config), args


def require(value, what: str):
    if value is None:
        raise SystemExit(f"error: the config must set {what} for this job")
    return value
