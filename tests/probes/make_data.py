"""The synthetic dataset the tests use (hub schema, parquet), for runs by hand:

python tests/probes/make_data.py DIR [--train N] [--test N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support (which adds the repository)
from support import write_parquet_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(prog="make_data.py")
    parser.add_argument("path")
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--test", type=int, default=101)
    args = parser.parse_args()
    write_parquet_dataset(Path(args.path), args.train, args.test)


if __name__ == "__main__":
    main()
