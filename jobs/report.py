"""Write a run report: report.html with PNG plots beside it, and a short text summary.

Usage:
    python jobs/report.py output.dir=RUN_DIR        # one run
    python jobs/report.py output.dir=SWEEP_DIR      # every run below it, settings side by side
"""

import sys

from runner.report import build_report


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if "output.dir" not in args or any(not a.startswith("output.dir=") for a in argv):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        report = build_report(args["output.dir"])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
