"""`python -m laneproxy` is the `laneproxy` command."""

import sys

from laneproxy.cli import main

sys.exit(main())
