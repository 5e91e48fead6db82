"""python -m gcmd.clicmd: gcmd-cli."""

import sys

from gcmd.clicmd import main

sys.exit(main())
