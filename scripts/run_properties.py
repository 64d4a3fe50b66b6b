"""Run the property-based tests with many examples and print how many each property ran.

The test suite runs tests/test_properties.py with a few derandomised examples per property (the
``ci`` hypothesis profile). This script selects the ``thorough`` profile: random examples,
shrinking of failures, and ``--examples`` examples per property (default 1000).

    python scripts/run_properties.py                      # every property, 1000 examples each
    python scripts/run_properties.py --examples 200 -k weights

Prints hypothesis's statistics (passing, failing, invalid examples per property), then one line per
property with the number of times it ran, and exits with pytest's status.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="examples per property (default 1000)")
    parser.add_argument("-k", default=None, help="pytest -k expression selecting properties")
    parser.add_argument("-x", action="store_true", help="stop at the first failing property")
    args = parser.parse_args(argv)

    os.environ["TORCHMIX_HYPOTHESIS_PROFILE"] = "thorough"
    os.environ["TORCHMIX_PROPERTY_EXAMPLES"] = str(args.examples)
    sys.path.insert(0, str(ROOT))
    import pytest

    pytest_args = [str(ROOT / "tests" / "test_properties.py"), "-q", "-p", "no:cacheprovider",
                   "-W", "ignore", "--hypothesis-show-statistics"]
    if args.k:
        pytest_args += ["-k", args.k]
    if args.x:
        pytest_args.append("-x")
    start = time.perf_counter()
    status = pytest.main(pytest_args)
    elapsed = time.perf_counter() - start
    module = sys.modules.get("test_properties") or sys.modules.get("tests.test_properties")
    counts = getattr(module, "EXAMPLES", {})
    print(f"\ntimes each property ran ({args.examples} examples requested, {elapsed:.0f} s; hypothesis's "
          "statistics above split them into passing, failing and invalid examples):")
    for name in sorted(counts):
        print(f"  {counts[name]:7d}  {name}")
    print(f"  {sum(counts.values()):7d}  total")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
