"""``python -m adapt.core.cli``: the ``adapt`` command."""

import sys

from . import main

sys.exit(main())
