#!/usr/bin/env python3
"""Fit the model a TOML config describes: ``python scripts/fit.py CONFIG [--device DEV] [--out DIR] [--quiet]``.

The same as ``torchmix fit CONFIG ...``; see ``torchmix fit --help``.
"""

import sys

from torchmix.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
