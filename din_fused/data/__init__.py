"""Data for the DIN model: the MovieLens protocol of the paper and a synthetic generator.

The package is split by concern; every name is re-exported here, so
``din_fused.data.X`` keeps working:

* :mod:`.loading`: reading sources into an :class:`EventLog` (MovieLens CSVs,
  the synthetic generator) and the raw-id :class:`Vocab` saved with a model;
* :mod:`.protocol`: the definition of a sample (:func:`build_samples`), the
  :class:`SequenceDataset` store and the train/validation/test split by user;
* :mod:`.batching`: turning sample indices into padded or jagged batches, single
  process or DDP shards.

Both sources produce an :class:`EventLog` (time-ordered interactions of users
with items, each with a label) and go through the same :func:`build_samples`,
so they share one definition of "a sample":

    every event is a sample; its target is the event's item (with the item's
    attributes, e.g. its category), its label is the event's label, and its
    behaviour sequence is the same user's *strictly earlier* events in time
    order, the latest ``max_len`` of them.

"Strictly earlier": events with the same timestamp are not in each other's
history.  MovieLens users often rate dozens of movies in the same second;
their relative order carries no information, so neither may see the other.

Samples do not copy their histories.  A :class:`SequenceDataset` keeps one flat
behaviour store [M, A] (every event's attribute ids, grouped by user, in time
order) and each sample only records where its window starts and how long it
is; :meth:`SequenceDataset.batch` gathers the padded [b, T, A] tensor for a
batch of sample indices.  That keeps 100k MovieLens samples with T=50 at a few
MB instead of 2 x 100k x 50 int64.

Id conventions: every attribute id and context id is >= 1; 0 is padding, and
padded positions of a history are filled with 0.  Valid positions are always
the first ``length`` ones (left-aligned), which is what ``FusedDINAttention``
expects from ``keys_length``.
"""

from .batching import Batch, JaggedBatch, iterate_batches, num_train_steps
from .loading import (
    DataError,
    EventLog,
    Vocab,
    default_movielens_dir,
    read_movielens_events,
    synthetic_events,
)
from .protocol import SequenceDataset, build_samples, load_movielens, make_synthetic, split_by_user

__all__ = [
    "DataError",
    "EventLog",
    "Vocab",
    "SequenceDataset",
    "Batch",
    "JaggedBatch",
    "build_samples",
    "split_by_user",
    "load_movielens",
    "read_movielens_events",
    "make_synthetic",
    "synthetic_events",
    "default_movielens_dir",
    "iterate_batches",
    "num_train_steps",
]
