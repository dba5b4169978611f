"""`python -m adapruner ...`: the same command line as the `adapruner` script."""

import sys

from adapruner.cli import main

sys.exit(main())
