"""Seeds needed to resolve a paired difference, from the per-seed spread of a results ledger.

    python -m sparo_fast_experiment.power results/paper_cpu/results.json --delta 0.03

Reads the CLIP family at budget 1 (either ledger format) and prints ``report.power_table``.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparo_fast_experiment.power", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a results.json ledger")
    p.add_argument("--delta", type=float, default=0.03, help="the paired difference to resolve")
    p.add_argument("--power", type=float, default=0.8)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--budget", default="1")
    p.add_argument("--metric", default="compositional_mean")
    args = p.parse_args(argv)
    if not os.path.isfile(args.results):
        p.error(f"no such file: {args.results}")
    from .ledger import Ledger
    from .report import power_table

    cell = Ledger(args.results).cell("clip", args.budget)
    if "sparo" not in cell or len(cell) < 2:
        p.error(f"{args.results} has no SPARO and baseline runs at budget {args.budget}")
    print(power_table(cell, metric=args.metric, delta=args.delta, power=args.power, alpha=args.alpha), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
