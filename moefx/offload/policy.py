"""Which resident expert to evict: Belady's rule where the future is known, LRU or LFU otherwise.

A key is (layer index, expert). ``victim(candidates)`` picks among the evictable resident keys; ``touch``
records an access. Belady (1966) evicts the key whose next use is farthest: the runtime tells it the
accesses it knows are coming (``expect``: a layer's experts from pre-gating, the next layer's from
layer-ahead prediction), in order. A key outside that window is ranked by when its layer runs next: the
layer order is known even where the experts are not (a layer that just ran is needed last), and among
keys tied on that, the least frequently then least recently used goes first.
"""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Hashable, Iterable, Optional, Sequence

Key = Hashable


class Policy:
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

    def rank(self, key: Key) -> tuple:
        """Smaller is evicted first."""
        raise NotImplementedError

    def expect(self, future: Sequence[Key], layer: Optional[int] = None) -> None:
        """Accesses known to come, in order; ``layer``: the layer running now (its index in the key)."""

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
    """Farthest next use first. ``num_layers``: keys are (layer, expert) and layers run in a cycle."""

    name = "belady"
    NEVER = float("inf")

    def __init__(self, num_layers: Optional[int] = None):
        super().__init__()
        self.num_layers = num_layers
        self.future: dict[Key, int] = {}
        self.window = 0
        self.layer: Optional[int] = None
        self.covered: set = set()

    def expect(self, future: Sequence[Key], layer: Optional[int] = None) -> None:
        self.future, self.window, self.layer = {}, len(future), layer
        for position, key in enumerate(future):
            self.future.setdefault(key, position)
        self.covered = {key[0] for key in future} if self.num_layers else set()

    def touch(self, key: Key) -> None:
        super().touch(key)
        # an access consumes the first expected use of the key: its next one (if any) is not known
        if key in self.future:
            del self.future[key]

    def next_use(self, key: Key) -> float:
        if key in self.future:
            return self.future[key]
        if self.num_layers is None or self.layer is None:
            return self.NEVER
        # not in the window: no sooner than its layer's next turn after the window; a layer whose experts the
        # window lists does not want this one this turn
        turn = (key[0] - self.layer - 1) % self.num_layers
        return self.window + turn + (self.num_layers if key[0] in self.covered else 0)

    def rank(self, key: Key) -> tuple:
        return -self.next_use(key), self.count[key], self.last.get(key, -1)

    def sooner(self, key: Key, than: Key) -> bool:
        return self.next_use(key) < self.next_use(than)


POLICIES = {"lru": LRU, "lfu": LFU, "belady": Belady}
