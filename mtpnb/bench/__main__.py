"""python -m mtpnb.bench: the bench's command line (see mtpnb.bench)."""

import sys

from ..platform import reexec_with_openblas
from .cli import main

reexec_with_openblas()  # returns when there is nothing to gain (or done already)
sys.exit(main())
