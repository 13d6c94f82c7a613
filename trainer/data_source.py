"""What the trainer needs from a data source: the :class:`DataSource` protocol.

Both sources satisfy it: :class:`moe_cpt.trainer.synthetic_data.SyntheticSource` and the mixer's
datasets (:class:`moe_cpt.mixer.dataset.MixedDataset` in-process, :class:`moe_cpt.mixer.service.client.ServiceMixedDataset`
over HTTP, both :class:`moe_cpt.mixer.contract.BlendDataset`). :func:`moe_cpt.trainer.data.build_source` returns
one; the data loader and the trainer use nothing else of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DataSource(Protocol):
    """One DP rank's view of a deterministic token stream.

    Iterating yields samples ``{"tokens", "positions"}`` (``seq_len + 1`` each) plus ``source``
    (the index of the sample's source in ``source_names``); ``state_dict`` is global (the same
    on every rank) so a run resumes on any DP size dividing ``global_batch_size``.
    """

    @property
    def source_names(self) -> list[str]: ...

    @property
    def seq_len(self) -> int: ...

    @property
    def global_batch_size(self) -> int: ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]:
        """What the run record stores about the source (kind, names, versions, ...)."""
        ...

    def validation_samples(self, source: int, count: int) -> list[dict[str, Any]]:
        """``count`` fixed held-out samples of source ``source`` (fewer if its split is short)."""
        ...
