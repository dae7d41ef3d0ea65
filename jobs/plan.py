"""See a job's plan without running it: read, tokenize and plan the input; no model is loaded.

Takes the same overrides as jobs/generate.py and prints rows, prompt tokens, batches,
shards, prompt-side padding efficiency (windowed and with one global sort) and the
longest prompts. Nothing is written.

Usage:
    python jobs/plan.py dataset.path=prompts/ dataset.id_column=qid generation.max_new_tokens=512
    python jobs/plan.py dataset.path='s3://bucket/prompts/*.parquet' batching.shard_size=500
"""

import sys

import hydra
from omegaconf import DictConfig

from runner import cli
from runner.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> int:
    return cli.plan(cfg)


if __name__ == "__main__":
    # A dry run writes nothing: no Hydra run directory either.
    sys.argv += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout", "output.dir=unused"]
    main()
