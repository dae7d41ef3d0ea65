"""What the entry points in jobs/ call: turn a composed config into a run and report it."""

from __future__ import annotations

import logging
import sys
from typing import Any

from runner.config import to_job_config
from runner.errors import ConfigError, JobFailedError

log = logging.getLogger("runner")
EXAMPLES = 3
_session = None  # one per process: a Hydra sweep reuses Ray, the workers and the prepared input


def process_session():
    """The session shared by every job this process runs; closed when the process exits."""
    global _session
    if _session is None:
        import atexit

        from runner.cluster import Session

        _session = Session()
        atexit.register(_session.close)
    return _session


def take_submitted_secrets() -> None:
    """In a job sent by `jobs/submit.py`: set its secret environment and add its credential-bearing overrides."""
    import os

    from runner.secrets import submitted_secrets

    secrets = submitted_secrets()
    for key, value in secrets.get("env", {}).items():
        os.environ.setdefault(key, value)
    sys.argv.extend(secrets.get("overrides", []))


def generate(cfg: Any) -> int:
    """Run the generation job described by a Hydra config; print the summary and a few completions.

    Returns:
        0 on success; exits with 2 on bad config or input (the message names every problem).
    """
    from runner.driver import run_job
    from runner.secrets import mask_text

    try:
        job = to_job_config(cfg)
        summary = run_job(job, session=process_session())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except JobFailedError as e:
        print(f"error: the job failed: {mask_text(str(e))}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # a bug or an environment the runner did not foresee: one line, the details logged
        unexpected(e)
    print("\n" + summary.describe())
    print_examples(summary.output_uri)
    query = f"SELECT id, finish_reason, completion FROM read_parquet('{summary.output_dir}/*.parquet')"
    print(f'\nquery it:  python -c "import duckdb; duckdb.sql(\\"{query}\\").show()"')
    return 0


def plan(cfg: Any, compare_global: bool = False) -> int:
    """Dry run: print the plan of the job a Hydra config describes. Exits with 2 on bad config or input."""
    from runner.driver import dry_run

    try:
        report = dry_run(to_job_config(cfg), compare_global)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # as in generate()
        unexpected(e)
    print(report.describe())
    return 0


def unexpected(e: BaseException) -> None:
    """End the process on an unforeseen error: one line naming it and where its traceback is, exit status 1.

    The traceback goes to the job's log file (Hydra's `_generate.log`), not the terminal; the committed
    shards stay, so rerunning the same command goes on from them.
    """
    import traceback

    from runner.errors import first_line
    from runner.secrets import mask_text

    trace = mask_text("".join(traceback.format_exception(e)))  # credentials in URIs masked, as everywhere
    where = None
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "unexpected failure\n%s", (trace,), None)
            handler.handle(record)
            where = handler.baseFilename
    if where is None:  # no log file (a plain Python caller): the traceback goes to a file of its own
        import tempfile

        with tempfile.NamedTemporaryFile("w", prefix="runner-error-", suffix=".log", delete=False) as f:
            f.write(trace)
            where = f.name
    shown = f"{type(e).__name__}: {mask_text(first_line(e, 300))}"
    detail = f"the traceback is in {where}"
    print(
        f"error: unexpected failure ({shown}); {detail}. Committed shards are kept: once the cause is fixed, "
        "rerun the same command to go on from them (please report it if it looks like a bug)",
        file=sys.stderr,
    )
    sys.exit(1)


def print_examples(output_dir: str, count: int = EXAMPLES) -> None:
    """Show the first few completions (by id) so a user sees real output at once."""
    from runner import store

    out = store.open_output_dir(output_dir)
    files = store.list_data_files(out)
    if not files:
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runner.secrets import mask_text

    try:
        with out.fs.open_input_file(files[0].path) as f:
            schema = pq.read_schema(f)
            scored = "prompt_logprob_sum" in schema.names  # a scoring job: its rows' sums, not completions
            extra = ["prompt_logprob_sum", "prompt_tokens"] if scored else []
            table = pq.read_table(f, columns=["id", "sample_index", "completion", "finish_reason", "error", *extra])
    except (OSError, pa.ArrowException) as e:  # the job is done and committed: showing examples is a courtesy
        log.warning("could not read back examples from %s: %s", out.display, mask_text(str(e)))
        return
    table = table.sort_by([("id", "ascending"), ("sample_index", "ascending")]).slice(0, count)
    print(f"\na few {'scores' if scored else 'completions'} (from {files[0].base_name}):")
    for row in table.to_pylist():
        if scored and row["prompt_logprob_sum"] is not None:
            n, total = max(row["prompt_tokens"] - 1, 1), row["prompt_logprob_sum"]
            print(f"- [{row['id']}] sum of log p {total:.3f} over {n} tokens, mean {total / n:.3f}")
            continue
        completion = (row["completion"] if row["completion"] is not None else row["error"] or "").strip()
        completion = completion.replace("\n", " ")
        print(f"- [{row['id']}] ({row['finish_reason']}) {completion[:300]}")
