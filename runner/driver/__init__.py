"""The driver: start a job, stream its windows, plan them into shard tasks, feed the pool, follow the
progress, commit the manifest; the dry run. No torch.
"""

from runner.driver.dryrun import DryRun, dry_run
from runner.driver.job import RunSummary, run_job

__all__ = ["DryRun", "RunSummary", "dry_run", "run_job"]
