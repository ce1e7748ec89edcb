"""``python -m qmriflow`` == the ``qmriflow`` console script."""

import sys

from .cli import main

sys.exit(main())
