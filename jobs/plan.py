"""See a job's plan without running it: read, tokenize and plan the input; no model is loaded.

Takes the same overrides as jobs/generate.py and prints rows, prompt tokens, batches,
shards, prompt-side padding efficiency and the longest prompts. Nothing is written.
--compare-global-sort also plans the same rows with one global sort (what windowed
sorting costs in padding; keeps every prompt length in memory, 4 bytes a row).

Usage:
    python jobs/plan.py dataset.path=prompts/ dataset.id_column=qid generation.max_new_tokens=512
    python jobs/plan.py --compare-global-sort dataset.path='s3://bucket/prompts/*.parquet'
"""

import sys

import hydra
from omegaconf import DictConfig

from runner import cli
from runner.config import register_configs

register_configs()
COMPARE = "--compare-global-sort"
compare_global = False


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> int:
    return cli.plan(cfg, compare_global)


if __name__ == "__main__":
    compare_global = COMPARE in sys.argv
    # A dry run writes nothing: no Hydra run directory or log file either.
    args = [a for a in sys.argv[1:] if a != COMPARE]
    sys.argv = [sys.argv[0], *args, "hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout"]
    sys.argv.append("output.dir=unused")
    main()
