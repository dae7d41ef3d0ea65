"""The worker side: the actor shell, the engine, the KV cache, sampling, model loading, the memory budget.

Importing the package imports no torch (the pool on the driver names `ShardGenerator` to
start actors); the engine's names load torch when first used.
"""

from typing import Any

from runner.generation.settings import build_generation_config
from runner.generation.worker import ShardGenerator, running_rows

__all__ = [
    "Decoding",
    "Engine",
    "Limits",
    "Row",
    "ShardGenerator",
    "build_generation_config",
    "load_model",
    "memory_budget",
    "pick_device",
    "running_rows",
]
_LAZY = {
    "Decoding": "runner.generation.sampling",
    "Engine": "runner.generation.engine",
    "Limits": "runner.generation.limits",
    "Row": "runner.generation.engine",
    "load_model": "runner.generation.model",
    "memory_budget": "runner.generation.model",
    "pick_device": "runner.generation.model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
