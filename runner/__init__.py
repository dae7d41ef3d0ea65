"""Distributed batch generation for LLMs: Hydra configs, Ray actors, 4-bit models, Parquet out."""

__version__ = "0.1.0"
