"""Entry point of ``python -m msd_core``."""

import sys

from .cli import main

sys.exit(main())
