"""`python -m mtpnb`: the `mtpnb` command."""

import sys

from .cli import main

sys.exit(main())
