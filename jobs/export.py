"""Export a finished run's directory in another tool's format.

Usage:
    python jobs/export.py output.dir=out/run1 export.format=openai_batch export.path=out/run1-batch.jsonl \
        [export.shape=auto|chat|completion]

`export.format=openai_batch`: the OpenAI Batch API's output JSONL, one line per input row, its `custom_id`
the row's id and its `response.body` a `chat.completion` (export.shape=chat) or a `text_completion`
(completion) with every sample in `choices`; `auto` (the default) answers a run of an OpenAI Batch file
(dataset.format=openai_batch) line by line as each request's url asks, and any other run with chat when it
used a chat template. `export.path` is a local path or an object-store URI (s3://, gs://); the file is written
under a temporary name and renamed into place. The run must be complete (its `_manifest.json` written):
exit status 2 otherwise, with what is missing.
"""

import json
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from runner.secrets import mask_text
from runner.store import (
    BATCH_SHAPES,
    batch_lines,
    batch_shape,
    list_data_files,
    open_output_dir,
    read_manifest,
    verify_run,
)

KEYS = ("output.dir", "export.format", "export.path", "export.shape")
FORMATS = ("openai_batch",)


def fail(message: str) -> int:
    print(f"error: {mask_text(message)}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = [a for a in argv if a.split("=", 1)[0] not in KEYS]
    if unknown or not all(k in args for k in KEYS[:3]):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if args["export.format"] not in FORMATS:
        return fail(f"export.format={args['export.format']!r}: accepted values are {', '.join(FORMATS)}")
    shape = args.get("export.shape", "auto")
    if shape not in BATCH_SHAPES:
        return fail(f"export.shape={shape!r}: accepted values are {', '.join(BATCH_SHAPES)}")
    out = open_output_dir(args["output.dir"])
    manifest = read_manifest(out)
    verdict = verify_run(args["output.dir"])
    if manifest is None or not verdict.ok:
        problems = "; ".join(verdict.problems[:3]) or "no _manifest.json"
        return fail(f"{out.display} is not a complete run ({problems}): finish it first (rerun the same command)")
    if shape == "auto":
        shape = batch_shape(manifest.get("config", {}))
    target = args["export.path"]
    if "://" in target:
        fs, path = pafs.FileSystem.from_uri(target)
    else:
        fs, path = pafs.LocalFileSystem(), str(Path(target).resolve())
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    run_id = str(manifest["run_id"])
    created, lines = int(time.time()), 0
    scratch = f"{path}.tmp-{time.time_ns()}"
    with fs.open_output_stream(scratch) as f:
        for info in list_data_files(out):
            with out.fs.open_input_file(info.path) as data:
                table = pq.read_table(data)
            for line in batch_lines(table, shape, run_id, created):
                f.write((json.dumps(line, ensure_ascii=False) + "\n").encode())
                lines += 1
    fs.move(scratch, path)
    shown = "each as its request's url asks" if shape == "request" else f"{shape} responses"
    print(f"{lines} lines ({shown}) from {verdict.rows} rows of {out.display} -> {mask_text(target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
