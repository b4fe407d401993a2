"""Job entry points are thin wrappers over `tdastore` commands: each runs its commands with the job's arguments.

Run on a cluster with
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/<name>.py --config configs/<x>.yaml
or, equally, `ray job submit ... -- tdastore <command> --config configs/<x>.yaml` where tdastore is installed.
The working directory (this repository) is uploaded; `tdastore` is imported from it, and every Ray worker
receives the package through the job's runtime_env (see tdastore.distributed.ray_session).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the uploaded working directory holds the package
    sys.path.insert(0, str(ROOT))


def run(*commands: list[str]) -> None:
    """Run each `tdastore` command with this job's own arguments (--config CFG and any config flags) appended;
    stop at the first that fails, with its exit status."""
    from tdastore.cli import main

    for command in commands:
        status = main([*command, *sys.argv[1:]])
        if status:
            raise SystemExit(status)
