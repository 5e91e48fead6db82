"""``python -m gcmd``: the same as the ``gcmd`` command."""

import sys

from gcmd.cli import main

sys.exit(main())
