"""The ``moefx`` command line."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moefx", description="Run dense PyTorch models as Mixture-of-Experts")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="convert all-MiniLM-L6-v2 with each method and compare embeddings")
    demo.add_argument("--sentences", type=int, default=300, help="held-out sentences to compare on")
    demo.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from moefx.demo import format_rows, run_demo

        rows = run_demo(num_eval=args.sentences, num_calibration=args.calibration)
        print("all-MiniLM-L6-v2 (real weights), sentence-embedding cosine to the dense model on "
              f"{args.sentences} sentences of Python's documentation:")
        print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
