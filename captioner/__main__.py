"""``python -m captioner``: see :mod:`captioner.cli`."""

import sys

from captioner.cli import main

sys.exit(main())
