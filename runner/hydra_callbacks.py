"""A Hydra callback that keeps credentials in URIs out of the configs Hydra saves beside a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from runner.secrets import mask_files

SAVED = ("config.yaml", "hydra.yaml", "overrides.yaml")


class MaskSecrets(Callback):
    """Hydra writes `.hydra/*.yaml` (and a sweep's `multirun.yaml`) before the job starts: mask them then.

    A sweep's directory is a Parquet dataset too (one subdirectory per point), so the sweep's
    `multirun.yaml` becomes `_multirun.yaml`, a name readers skip.
    """

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        hydra = config.hydra
        files: list[Path] = []
        if hydra.output_subdir is not None:
            saved = Path(hydra.runtime.output_dir) / str(hydra.output_subdir)
            files += [saved / name for name in SAVED]
        if hydra.mode is not None and str(hydra.mode).endswith("MULTIRUN"):
            sweep = Path(hydra.sweep.dir)
            if (sweep / "multirun.yaml").exists():
                (sweep / "multirun.yaml").replace(sweep / "_multirun.yaml")
            files.append(sweep / "_multirun.yaml")
        mask_files(files)
