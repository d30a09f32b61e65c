"""``python -m rhlens ...`` (and ``torchrun -m rhlens ...``): the ``rhlens`` command."""

import sys

from rhlens.cli import main

if __name__ == "__main__":
    sys.exit(main())
