"""`python -m tdastore`: the same as the `tdastore` command (for environments without its script on PATH)."""

import sys

from tdastore.cli import main

sys.exit(main())
