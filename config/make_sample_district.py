"""Regenerate the bundled sample district (OneRoster 1.1 bulk CSV).

    python config/make_sample_district.py                 # rewrites config/sample-district/
    python config/make_sample_district.py --out /tmp/d --seed 7

The committed ``config/sample-district/`` must equal this script's default output; a test
regenerates it and compares bytes, so rerun the script after changing
:mod:`rostersync.sampledata`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rostersync.sampledata import DistrictSpec, generate_district, write_oneroster_csv

DEFAULT_OUT = Path(__file__).resolve().parent / "sample-district"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="folder to write the CSV files into (default: config/sample-district)",
    )
    parser.add_argument("--seed", type=int, default=DistrictSpec().seed, help="random seed")
    args = parser.parse_args(argv)
    spec = DistrictSpec(seed=args.seed, edge_cases=True)
    roster = generate_district(spec)
    write_oneroster_csv(roster, args.out)
    print(
        f"wrote {args.out}: {len(roster.orgs)} orgs, {len(roster.persons)} users, "
        f"{len(roster.classes)} classes, {len(roster.enrollments)} enrollments"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
