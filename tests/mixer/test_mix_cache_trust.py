"""The disk cache trusts only folders no other user can write to (issue 11.9): a decoded copy
(``.tok``) carries its own digest, which whoever can write it can recompute."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from moe_cpt.errors import ConfigError
from moe_cpt.mixer.blocks import BlockLoader, CacheConfig
from moe_cpt.mixer.dataset import open_blend
from tests.support.mixer_store import spec


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cache_folders_are_created_private(mix_store: str, tmp_path: Path) -> None:
    _, dss = open_blend(spec(mix_store, {"new": 1.0}))
    cache = tmp_path / "cache" / "mixer"
    loader = BlockLoader(dss, CacheConfig(disk_dir=str(cache), prefetch_threads=0))
    loader.get(0, 0)
    loader.close()
    assert _mode(cache) == 0o700
    version_dirs = [p for p in cache.iterdir() if p.is_dir()]
    assert version_dirs and all(_mode(p) == 0o700 for p in version_dirs)
    assert list(cache.glob("*/*.tok"))  # the decoded copy was written there


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777], ids=["world", "group", "sticky-world"])
def test_a_cache_folder_others_can_write_is_refused(mix_store: str, tmp_path: Path, mode: int) -> None:
    _, dss = open_blend(spec(mix_store, {"new": 1.0}))
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(ConfigError, match="can be written by other users"):
        BlockLoader(dss, CacheConfig(disk_dir=str(shared), prefetch_threads=0))
