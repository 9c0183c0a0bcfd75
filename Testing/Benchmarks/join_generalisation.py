#!/usr/bin/env python
"""Join the cells of a generalisation run into one table: per (CT, source) cell and pooled.

    python Testing/Benchmarks/join_generalisation.py out/generalisation            # writes summary.md/json there
    python Testing/Benchmarks/join_generalisation.py part1/ part2/ --out joined/   # cells from several roots

Every folder below the roots that holds a ``run.json`` and a ``results.csv`` is a cell (one CT
with one X-ray source: ``corrreg benchmark`` output). The cells must share their case
definitions (protocol, detector, seed, start, degradations, registration options: refused
otherwise) and each (CT, source) pair may occur once. The table covers the methods every cell has
(``--methods`` to choose) on the first N cases that all of them finished (``--cases`` to fix N;
an unfinished cell then refuses). Statistics come from CorrRegLib.benchmark.summarize_cells:
SR at 10 / 2 / 1 mm, false flags (successes flagged / successes), missed failures (failures not
flagged / failures), median mTRE and median wall time; pooled over all cells, with the worst
cell's SR(10 mm).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def join(roots: list[str], out: str | Path, methods: list[str] | None = None, cases: int | None = None,
         command: str | None = None) -> dict:
    """Summarise every cell below ``roots`` into ``out``/summary.{json,md}; returns the summary."""
    from CorrRegLib.benchmark import find_cells, load_cell, summarize_cells, write_cells_summary

    folders = [f for r in roots for f in find_cells(r)]
    if not folders:
        raise ValueError(f"no benchmark cells (run.json + results.csv) below {', '.join(roots)}")
    summary = summarize_cells([load_cell(f) for f in folders], methods, cases)
    write_cells_summary(out, summary, command=command)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", nargs="+", help="folders holding cell folders (searched recursively)")
    ap.add_argument("--out", help="where summary.md / summary.json go (default: the first root)")
    ap.add_argument("--methods", help="comma-separated (default: those every cell has)")
    ap.add_argument("--cases", type=int, help="cases per cell (default: all that every cell finished)")
    args = ap.parse_args(argv)
    from CorrRegLib.benchmark import cells_table, pooled_table

    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    command = "join_generalisation.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        s = join(args.roots, args.out or args.roots[0], methods, args.cases, command)
    except ValueError as err:
        print(f"join_generalisation: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(s['cells'])} cells, {s['cases_per_cell']} cases each, protocol {s['protocol']}")
    print(pooled_table(s))
    print()
    print(cells_table(s))
    print(f"\nwrote {Path(args.out or args.roots[0]) / 'summary.md'} and summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
