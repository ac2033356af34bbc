"""Data: sources (plain text, JSON Lines, Parquet, Hugging Face datasets), their parallel
preparation into cached token shards, mixtures, and the (seed, step) -> windows batch samplers.

    sources.py   data.source -> files, formats and work units
    readers.py   a work unit -> its documents, streamed, bad input refused with file and line
    prepare.py   workers tokenize units into shards + an index; the atomic, fingerprinted cache
    tokens.py    a split's shards as one memory-mapped virtual array
    mixture.py   data.mixture checked and normalised
    batches.py   TrainBatches / ValBatches / ValSets: the one data order

Names are imported lazily, so that light users (config validation, preparation workers) do not
import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainBatches": "batches", "ValBatches": "batches", "ValSets": "batches", "make_batches": "batches",
    "prepare_sources": "batches", "val_loss_by_source": "batches", "DEFAULT_VAL_SEED": "batches",
    "PreparedCorpus": "prepare", "prepare_corpus": "prepare", "hash_fraction": "prepare",
    "list_source": "sources", "mixture_sources": "mixture", "check_mixture": "mixture",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"orchestrator.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'orchestrator.data' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
