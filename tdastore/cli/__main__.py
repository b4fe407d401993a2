"""`python -m tdastore.cli`: the same as the `tdastore` command."""

import sys

from tdastore.cli import main

sys.exit(main())
