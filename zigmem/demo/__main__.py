"""``python -m zigmem.demo``."""

import sys

from .cli import main

sys.exit(main())
