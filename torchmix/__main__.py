"""``python -m torchmix``: the same as the ``torchmix`` command (see :mod:`torchmix.cli`)."""

import sys

from .cli import main

sys.exit(main())
