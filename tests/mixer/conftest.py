from __future__ import annotations

import pytest

from tests.support.mixer_store import publish


@pytest.fixture(scope="session")
def mix_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local store with three sources: ``new`` (~60k tokens), ``replay`` (~12k, so it runs
    through epochs quickly) and ``code`` (~25k)."""
    store = str(tmp_path_factory.mktemp("mixstore") / "store")
    publish(store, "new", 1, 500)
    publish(store, "replay", 2, 100)
    publish(store, "code", 3, 200, mean_len=60, block_tokens=800)
    return store
