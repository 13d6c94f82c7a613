"""What the in-process :class:`~moe_cpt.mixer.dataset.MixedDataset` and the service client
:class:`~moe_cpt.mixer.service.client.ServiceMixedDataset` share: the dataset contract the trainer relies on
(source names and versions, ``seq_len``, global batch size, the state API)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import IterableDataset

from moe_cpt.mixer.spec import ResolvedBlend
from moe_cpt.mixer.state import MixState, find_states, merge_states


class BlendDataset(IterableDataset):
    """Base of the mixer's torch datasets: ``blend`` is the resolved blend, ``_state`` the
    :class:`MixState` iteration continues from."""

    blend: ResolvedBlend
    _state: MixState

    @property
    def source_names(self) -> list[str]:
        return self.blend.names

    @property
    def source_versions(self) -> list[str]:
        return [s.spec for s in self.blend.sources]

    @property
    def seq_len(self) -> int:
        return self.blend.spec.seq_len

    @property
    def global_batch_size(self) -> int:
        return self.blend.spec.global_batch_size

    def state_dict(self) -> dict[str, Any]:
        """Where this dataset's iteration continues (< 1 KiB of integers; the same format for
        the in-process dataset and the service client)."""
        return self._state.to_dict()

    def epochs(self) -> dict[str, float]:
        """Epochs per source consumed up to the step of the current state (all ranks)."""
        raise NotImplementedError

    def state_counts(self) -> dict[str, int]:
        """Global samples served per source up to the step of the current state."""
        return dict(zip(self.source_names, self._state.point.counts, strict=True))

    def describe(self) -> dict[str, Any]:
        """What a run record needs: the resolved blend (versions, weights/schedule, hold-out)."""
        return {"kind": "mixer", "blend": self.blend.to_json(), "source_names": self.source_names,
                "source_versions": self.source_versions, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "epochs": self.epochs()}

    @staticmethod
    def incoming_state(state: dict[str, Any]) -> MixState:
        """The :class:`MixState` in ``state``: a dataset state, or a whole ``StatefulDataLoader``
        state whose per-worker states are merged (the earliest unconsumed position wins)."""
        found = find_states(state)
        if len(found) > 1 and not state.get("mixer_state"):
            state = merge_states(found)
        elif found:
            state = found[0]
        return MixState.from_dict(state)
