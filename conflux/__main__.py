"""`python -m conflux`: the same as the `conflux` command."""

import sys

from conflux.cli.main import main

sys.exit(main())
