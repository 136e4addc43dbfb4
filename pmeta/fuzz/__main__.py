"""``python -m pmeta.fuzz TARGET``: see :mod:`pmeta.fuzz`."""

import sys

from . import main

sys.exit(main())
