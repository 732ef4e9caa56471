"""``python -m cspine_submit`` is the same CLI as ``cspine-submit``."""

import sys

from cspine_submit.cli import console_main

sys.exit(console_main())
