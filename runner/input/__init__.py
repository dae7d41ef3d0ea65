"""Find and read sources, parse and check rows, render and tokenize, prepare a chunk.

What preparer actors run, and what the driver asks of a model's files before a job starts
(its path, context length, tokenizer). No torch, no Ray.
"""

from runner.input.adapters import Adapter, check_fits, read_adapter
from runner.input.models import (
    COMPLETE_MARKER,
    applied_model_defaults,
    cache_root,
    context_length,
    folder_revision,
    is_complete_model_dir,
    load_tokenizer,
    prepare_embedded_model,
    quiet_transformers,
    resolve_model_path,
    resolve_revision,
)
from runner.input.prepare import ADAPTER, PREPARED_FIELDS, TOKENS, ChunkMeta, ChunkPreparer, PrepareSpec, prepare_chunk
from runner.input.settings import SETTINGS
from runner.input.sources import RawChunk, Source, chunk_digest, read_chunks
from runner.input.sources import resolve as resolve_source

__all__ = [
    "chunk_digest",
    "ADAPTER",
    "Adapter",
    "COMPLETE_MARKER",
    "PREPARED_FIELDS",
    "TOKENS",
    "ChunkMeta",
    "ChunkPreparer",
    "PrepareSpec",
    "RawChunk",
    "SETTINGS",
    "Source",
    "applied_model_defaults",
    "cache_root",
    "check_fits",
    "context_length",
    "folder_revision",
    "is_complete_model_dir",
    "load_tokenizer",
    "prepare_chunk",
    "prepare_embedded_model",
    "quiet_transformers",
    "read_adapter",
    "read_chunks",
    "resolve_source",
    "resolve_model_path",
    "resolve_revision",
]
