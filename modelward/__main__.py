"""``python -m modelward``."""

import sys

from modelward.cli import main

sys.exit(main())
