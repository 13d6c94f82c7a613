"""corpus: raw documents -> cleaned, deduplicated, tokenized shards, published as a version in the
store (:mod:`moe_cpt.store`, whose :func:`~moe_cpt.store.open_dataset` reads them back)."""
