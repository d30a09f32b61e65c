"""``python -m rhlens.cli ...``: the same as ``python -m rhlens ...``."""

import sys

from rhlens.cli import main

sys.exit(main())
