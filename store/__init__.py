"""The store: the versioned dataset format (shards, manifest, refs) and its read side.

Library entry point: :func:`open_dataset`.
"""

from moe_cpt.store.reader import BlockRef, DatasetVersion, open_dataset

__all__ = ["BlockRef", "DatasetVersion", "open_dataset"]
