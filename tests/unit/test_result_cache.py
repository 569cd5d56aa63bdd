"""ResultCache on its own: what it keeps, how it keeps it, and what it refuses."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from service.core.cache import ResultCache
from service.engines.tokenizer import TokenizedItem
from service.errors import ApiError, ErrorKind


def test_rows_are_kept_as_read_only_copies() -> None:
    cache = ResultCache(4)
    batch = np.arange(12, dtype=np.float32).reshape(3, 4)
    key = cache.key(TokenizedItem([101, 7, 102], [0, 0, 0], False), "unit")
    cache.put(key, batch[1])
    batch[1] = -1.0  # the worker's array may be reused or changed: the cache does not see it
    row = cache.get(key)
    assert row is not None and row.tolist() == [4.0, 5.0, 6.0, 7.0]
    assert row.base is None and not row.flags.writeable
    with pytest.raises(ValueError):
        row[0] = 0.0


def test_keys_tell_tags_and_type_ids_apart() -> None:
    single = TokenizedItem([101, 7, 102, 8, 102], [0, 0, 0, 0, 0], False)
    pair = TokenizedItem([101, 7, 102, 8, 102], [0, 0, 0, 1, 1], False)
    keys = {ResultCache.key(single, "unit"), ResultCache.key(single, "pooled"), ResultCache.key(pair, "unit")}
    assert len(keys) == 3
    assert ResultCache.key(TokenizedItem([101, 7, 102, 8, 102], [0] * 5, True), "unit") == \
        ResultCache.key(single, "unit")


def test_errors_are_not_remembered_and_counts_add_up() -> None:
    cache = ResultCache(2)
    cache.put("bad", ApiError(ErrorKind.BACKEND, "non-finite"))
    assert cache.get("bad") is None and len(cache) == 0
    for key in ("a", "b", "c"):
        cache.put(key, np.zeros(2, dtype=np.float32))
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") is not None
    assert (cache.hits, cache.misses) == (1, 2)
    with pytest.raises(ValueError):
        ResultCache(0)


def test_keys_are_exact_and_compact() -> None:
    def key(ids: list[int]) -> object:
        return ResultCache.key(TokenizedItem(ids, [0] * len(ids), False), "unit")

    distinct = [[1, 256], [256, 1], [1, 256, 0], [65536 + 1, 256], [250_001, 2], [2**31 + 5]]
    assert len({key(ids) for ids in distinct}) == len(distinct)
    assert key([250_001, 2]) == key([250_001, 2])
    long_ids = list(range(30_000, 30_512))  # 512 tokens, none of them a cached small int
    _tag, packed, type_ids = key(long_ids)  # type: ignore[misc]
    assert sys.getsizeof(packed) + sys.getsizeof(type_ids) < 3_000
    wide_types = TokenizedItem([5, 6], [0, 300], False)  # not from any tokenizer, but still a key of its own
    assert ResultCache.key(wide_types, "unit") != ResultCache.key(TokenizedItem([5, 6], [0, 44], False), "unit")
