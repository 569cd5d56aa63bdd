"""Results remembered for repeated inputs (--result-cache-size), one cache per served model.

The key is what the model computes from: the input's token ids and type ids after the prompt, truncation and
the tokenizer have done their work, with the kind of result asked for (a unit vector, a pooled vector, logits).
So two requests share an entry exactly when the model would be given the same tokens, whatever text, prompt
or truncation setting produced them. Only used on the event loop's thread, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import struct
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import numpy as np

from service.engines.tokenizer import TokenizedItem


class ResultCache:
    """The `capacity` most recently used results, each a read-only copy of its row."""

    __slots__ = ("_entries", "capacity", "computing", "hits", "misses")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a result cache holds at least one entry")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        # Inputs some request is computing now (key -> the future of its row), so that another request wanting
        # the same input waits for that row instead of computing it again.
        self.computing: dict[Hashable, asyncio.Future[Any]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(item: TokenizedItem, tag: str) -> Hashable:
        """The ids packed as 4-byte integers and the type ids as bytes: a tuple of ids would keep an int object
        of 28 bytes per token alive besides its 8-byte slot (~22 KB for a 512-token input against ~2.6 KB)."""
        ids = item.ids
        try:
            type_ids: Hashable = bytes(item.type_ids)
        except ValueError:  # a type id above 255: no tokenizer makes one, but it would still be a key
            type_ids = tuple(item.type_ids)
        return tag, struct.pack(f"<{len(ids)}I", *ids), type_ids

    def get(self, key: Hashable) -> np.ndarray | None:
        row = self._entries.get(key)
        if row is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return row

    def put(self, key: Hashable, row: object) -> None:
        """Remember a computed row (an error in its place is not remembered)."""
        if not isinstance(row, np.ndarray):
            return
        # A copy: the worker's row is a view of its whole pass's output, which it would keep alive.
        stored = np.array(row, copy=True)
        stored.flags.writeable = False  # shared by every later request for the same input
        self._entries[key] = stored
        self._entries.move_to_end(key)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
