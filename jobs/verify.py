"""Check a finished run's directory against its manifest.

Usage:
    python jobs/verify.py output.dir=out/run1

Exit status 0 only when every file is present and readable, row counts match
the manifest, every (id, sample_index) appears exactly once and the schema
holds every contract column; otherwise 1, with each problem listed.
"""

import sys

from runner.verify import verify_run


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = [a for a in argv if not a.startswith("output.dir=")]
    if "output.dir" not in args or unknown:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    verdict = verify_run(args["output.dir"])
    if verdict.ok:
        print(f"OK: {verdict.rows} rows in {verdict.files} files, each (id, sample_index) once")
        return 0
    print(f"FAILED: {len(verdict.problems)} problems in {args['output.dir']}", file=sys.stderr)
    for problem in verdict.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
