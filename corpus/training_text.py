"""The cleaned texts of a dataset config, read in-process (for tokenizer training)."""

from __future__ import annotations

from collections.abc import Iterator

from moe_cpt.corpus.build import front_steps, plan_inputs
from moe_cpt.corpus.config import DatasetConfig


def iter_config_texts(cfg: DatasetConfig, max_docs: int | None = None) -> Iterator[str]:
    """Run the readers + cleaning steps of ``cfg`` as one task and yield document texts."""
    from datatrove.utils.logging import logger

    logger.disable("datatrove")  # per-file INFO lines are noise here
    try:
        data = None
        for step in front_steps(cfg, plan_inputs(cfg)):
            data = step(data, rank=0, world_size=1)
        for i, doc in enumerate(data or ()):
            if max_docs is not None and i >= max_docs:
                break
            yield doc.text
    finally:
        logger.enable("datatrove")
