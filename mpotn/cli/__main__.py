"""``python -m mpotn.cli``: the ``mpotn`` command."""

import sys

from mpotn.cli import main

sys.exit(main())
