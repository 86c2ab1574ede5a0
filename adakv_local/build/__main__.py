"""``python -m adakv_local.build``: build (or reuse) and install the patched runtime."""

import sys

from .runtime import main

sys.exit(main())
