"""The packings' LRU cache (mixer/lru.py): values made once per key, the least recently used
dropped first."""

from __future__ import annotations

from moe_cpt.mixer.lru import LruCache


def test_lru_cache_makes_each_value_once_and_drops_the_least_recently_used() -> None:
    made: list[int] = []

    def make(k: int):
        return lambda: made.append(k) or k * 10

    cache: LruCache[int, int] = LruCache(2)
    assert [cache.get(k, make(k)) for k in (1, 2, 1)] == [10, 20, 10]
    assert made == [1, 2]  # 1 was served from the cache
    cache.get(3, make(3))  # evicts 2 (1 was used more recently)
    assert [cache.get(k, make(k)) for k in (1, 2)] == [10, 20]
    assert made == [1, 2, 3, 2]
