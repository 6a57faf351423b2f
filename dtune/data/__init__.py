"""Data: records in several formats -> rendered, tokenized, masked Examples -> per-rank micro-batches.

Modules: ``formats`` (record formats -> Row), ``sources`` (files, built-ins, mixtures, the held-out split),
``render`` (Row -> Example), ``packing`` (several samples per row), ``load`` (the cached pipeline),
``batching`` (collate, StepSampler), ``examples`` (the types); ``stream`` and ``shards``: data.streaming (rows read
and tokenized as the run goes, StreamSampler).
"""

from dtune.data.batching import StepSampler, collate, train_batches
from dtune.data.examples import IGNORE, DataStats, Example
from dtune.data.formats import Row
from dtune.data.load import load_data
from dtune.data.render import Renderer

__all__ = ["IGNORE", "DataStats", "Example", "Renderer", "Row", "StepSampler", "collate", "load_data", "train_batches"]
