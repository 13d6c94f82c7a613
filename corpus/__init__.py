"""corpus: raw documents -> cleaned, deduplicated, tokenized, versioned shards in an object store.

Library entry point: :func:`open_dataset`.
"""

from corpus.reader import BlockRef, DatasetVersion, open_dataset

__all__ = ["BlockRef", "DatasetVersion", "open_dataset"]
