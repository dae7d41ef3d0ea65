"""Check a finished run's directory against its manifest.

Usage:
    python jobs/verify.py output.dir=out/run1

Exit status 0 only when every file is present and readable, row counts match
the manifest, every (id, sample_index) appears exactly once and the schema
holds every contract column; otherwise 1, with each problem listed. Rows that
failed (finish_reason=error) are counted and named; they are not a problem of
the directory (rerun with output.retry_errors=true to generate them again).
"""

import sys

from runner.secrets import mask_text
from runner.store import verify_run


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = [a for a in argv if not a.startswith("output.dir=")]
    if "output.dir" not in args or unknown:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    verdict = verify_run(args["output.dir"])
    errors = f"{verdict.errors} error rows (finish_reason=error)"
    if verdict.errors:
        errors += f", e.g. {verdict.error_examples}: rerun with output.retry_errors=true to generate them again"
    if verdict.ok:
        print(f"OK: {verdict.rows} rows in {verdict.files} files, each (id, sample_index) once; {errors}")
        return 0
    print(f"FAILED: {len(verdict.problems)} problems in {mask_text(args['output.dir'])}; {errors}", file=sys.stderr)
    for problem in verdict.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
