"""``python -m qmriflow.cli`` == the ``qmriflow`` console script."""

import sys

from . import main

sys.exit(main())
