"""rows -> normalised examples -> token arrays -> batches (see each module's docstring).

  formats.py    row formats -> SFTExample / PairExample / UnpairedExample / RankedExample
  tokenize.py   examples -> token arrays (chat templates, exact boundaries, truncation)
  loading.py    sources (datasets, files, hub ids, synthetic) -> records, bad-row handling
  batching.py   records -> fixed-shape batches in a seeded, resumable order
  synthetic.py  the embedded task: a tiny language with an exact gold reward
"""

from rlhf_jax.data.batching import BatchStream, bucket_length, default_buckets
from rlhf_jax.data.formats import (DataError, PairExample, RankedExample, SFTExample,
                                   UnpairedExample)
from rlhf_jax.data.loading import DatasetStats, load_rows, prepare
from rlhf_jax.data.tokenize import TokenizeConfig, tokenize_example

__all__ = [
    "BatchStream", "bucket_length", "default_buckets", "DataError", "PairExample",
    "RankedExample", "SFTExample", "UnpairedExample", "DatasetStats", "load_rows", "prepare",
    "TokenizeConfig", "tokenize_example",
]
