"""Which resident expert to evict: Belady's rule where the future is known, LRU or LFU otherwise.

A key is (layer index, expert). ``victim(candidates)`` picks among the evictable resident keys; ``touch``
records an access. Belady (1966) evicts the key whose next use is farthest: the runtime tells it the
accesses it knows are coming (``expect``: the running layer's experts, a pre-gated block's at its entry,
the next layer's predicted ones), in order. Keys outside that window are evicted first, least recently
used first: decoding reuses experts from token to token (local routing consistency), which LRU keeps and
ranking by the layers' turn order (tried: the layer that just ran is needed last) threw away.
"""
from __future__ import annotations

import abc
import itertools
from collections import Counter
from typing import Hashable, Iterable, Sequence

Key = Hashable


class Policy(abc.ABC):
    """Access bookkeeping shared by the eviction rules; each rule is its ``rank``."""

    name = "policy"

    def __init__(self):
        self.clock = itertools.count()
        self.last: dict[Key, int] = {}
        self.count: Counter = Counter()

    def touch(self, key: Key) -> None:
        self.last[key] = next(self.clock)
        self.count[key] += 1

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=self.rank)

    @abc.abstractmethod
    def rank(self, key: Key) -> tuple:
        """Smaller is evicted first."""

    def expect(self, future: Sequence[Key]) -> None:
        """Accesses known to come, in order."""

    def sooner(self, key: Key, than: Key) -> bool:
        """Whether ``key`` is needed before ``than``: prefetching ``key`` may then evict ``than``."""
        return True


class LRU(Policy):
    name = "lru"

    def rank(self, key: Key) -> tuple:
        return (self.last.get(key, -1),)


class LFU(Policy):
    name = "lfu"

    def rank(self, key: Key) -> tuple:
        return self.count[key], self.last.get(key, -1)


class Belady(Policy):
    """Farthest known next use first; experts with no known use go before them, least recently used first."""

    name = "belady"

    def __init__(self):
        super().__init__()
        self.future: dict[Key, int] = {}

    def expect(self, future: Sequence[Key]) -> None:
        self.future = {}
        for position, key in enumerate(future):
            self.future.setdefault(key, position)

    def touch(self, key: Key) -> None:
        super().touch(key)
        self.future.pop(key, None)  # an access consumes the expected use; the next one is not known

    def rank(self, key: Key) -> tuple:
        if key in self.future:
            return 1, -self.future[key], 0
        return 0, 0, self.last.get(key, -1)

    def sooner(self, key: Key, than: Key) -> bool:
        return key in self.future and (than not in self.future or self.future[key] < self.future[than])


POLICIES = {"lru": LRU, "lfu": LFU, "belady": Belady}
