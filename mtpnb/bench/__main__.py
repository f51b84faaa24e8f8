"""python -m mtpnb.bench: the bench's command line (see mtpnb.bench)."""

import sys

from .cli import main

sys.exit(main())
