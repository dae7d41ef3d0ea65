"""Submit a generation job to a Ray cluster with Ray's Jobs API, stream its logs, exit with its status.

Usage:
    python jobs/submit.py [--address http://127.0.0.1:8265] [--no-wait] [generate.py overrides ...]

    RAY_AUTH_MODE=token python jobs/submit.py dataset.path=conf/data/demo_prompts.jsonl output.dir=/shared/out/run1

The job runs `python jobs/generate.py cluster.address=auto OVERRIDES` on the cluster with this
repository as its working directory (files ignored by git are not uploaded). Paths in the
overrides are read on the cluster: use shared storage (s3://, gs://, NFS) for output.dir on
a real multi-machine cluster. Exit status: 0 when the job succeeded, 1 when it failed or
was stopped, 2 for bad arguments.
"""

import argparse
import sys

from runner.cluster import submit_and_follow

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="http://127.0.0.1:8265", help="the cluster's dashboard address")
    parser.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    parser.add_argument("overrides", nargs="*", help="generate.py overrides, key=value")
    args = parser.parse_args()
    sys.exit(submit_and_follow(args.address, args.overrides, wait=not args.no_wait))
