"""``python -m tunnelgate``: the same as the ``tunnelgate`` command."""

import sys

from tunnelgate.cli import main

sys.exit(main())
