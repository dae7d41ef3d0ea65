"""Run a batch-generation job.

Usage:
    python jobs/generate.py                                   # the demo job
    python jobs/generate.py dataset.path=my.jsonl dataset.prompt_column=question \
        dataset.id_column=qid generation.max_new_tokens=128 output.dir=out/run1
    python jobs/generate.py -m generation.do_sample=true generation.temperature=0.3,0.7   # a sweep
    python jobs/generate.py --cfg job                        # print the composed config
"""

import hydra
from omegaconf import DictConfig

from runner import cli
from runner.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> int:
    return cli.generate(cfg)


if __name__ == "__main__":
    cli.take_submitted_secrets()  # a job sent by jobs/submit.py: its credentials, never on its command line
    main()
