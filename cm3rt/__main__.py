"""`python -m cm3rt` runs the command line."""

import sys

from cm3rt.cli import main

sys.exit(main())
