"""``python -m maskdino_lrp.eval --config demo --images N --seed S --out DIR``."""
from __future__ import annotations

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
