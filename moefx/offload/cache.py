"""The fast tier: a byte budget of experts, filled on demand and by a prefetcher thread.

Bytes of resident experts plus those being loaded never exceed the budget: room is made by evicting
what the policy picks among experts no running layer holds (``pin``), and a prefetch that would have to
evict an expert needed sooner than itself (by the policy's known future) is not started. A miss loads on
demand in the calling thread; a key being prefetched is waited for. Counters: a request is a hit when the
expert is resident, late when its prefetch is still in flight, a miss otherwise.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

from moefx.offload.policy import Key, Policy
from moefx.offload.store import Loaded, SlowTier


@dataclass
class CacheStats:
    requests: int = 0
    hits: int = 0
    late: int = 0
    misses: int = 0
    prefetches: int = 0          # loads the prefetcher started
    prefetch_skipped: int = 0    # prefetches not started: no room without evicting something needed sooner
    wasted: int = 0              # prefetched experts evicted before any use
    bytes_loaded: int = 0        # slow -> fast tier
    wait_s: float = 0.0          # compute thread blocked on loads (on demand or late prefetches)
    evictions: deque = field(default_factory=lambda: deque(maxlen=4096), repr=False)  # latest evicted keys, in order

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 1.0

    def summary(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "evictions"} | {"hit_rate": self.hit_rate}


class ExpertCache:
    """Experts by key (layer index, expert) in fast memory under ``budget`` bytes, evicting by ``policy``."""

    def __init__(self, tier: SlowTier, layers: list[str], budget: int, policy: Policy, prefetch_thread: bool = True):
        self.tier, self.layers, self.budget, self.policy = tier, layers, budget, policy
        self.resident: dict[Key, Loaded] = {}
        self.loading: dict[Key, Future] = {}
        self.reserved: dict[Key, int] = {}  # bytes of resident and loading keys
        self.pinned: Counter = Counter()
        self.unused: set[Key] = set()  # prefetched, not yet requested
        self.stats = CacheStats()
        self.lock = threading.Condition()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="moefx-prefetch") if prefetch_thread else None
        self.peak = 0
        self.sizes: dict[Key, int] = {}

    def size(self, key: Key) -> int:
        if key not in self.sizes:
            layer, expert = key
            self.sizes[key] = sum(t.nbytes for t in self.tier.source(self.layers[layer], expert) if t is not None)
        return self.sizes[key]

    @property
    def used(self) -> int:
        return sum(self.reserved.values())

    def pin(self, keys: Iterable[Key]) -> None:
        with self.lock:
            self.pinned.update(keys)

    def unpin(self, keys: Iterable[Key]) -> None:
        with self.lock:
            self.pinned.subtract(keys)
            self.pinned += Counter()  # drop zero counts
            self.lock.notify_all()

    def get(self, key: Key) -> tuple:
        """Expert ``key``'s fast-tier tensors, loading it on a miss."""
        with self.lock:
            self.stats.requests += 1
            self.policy.touch(key)
            self.unused.discard(key)
            if key in self.resident:
                self.stats.hits += 1
                return self._ready(self.resident[key])
            start, demand = time.perf_counter(), False
            if key in self.loading:
                self.stats.late += 1
                future = self.loading[key]
            else:
                self.stats.misses += 1
                self._make_room(key, self.size(key), demand=True)
                future = self.loading[key] = Future()
                future.set_running_or_notify_cancel()
                demand = True
        if demand:
            try:
                loaded = self._load(key)
            except BaseException as error:
                future.set_exception(error)
                raise
            future.set_result(loaded)
        else:
            loaded = future.result()
        with self.lock:
            self.stats.wait_s += time.perf_counter() - start
        return self._ready(loaded)

    def prefetch(self, keys: Iterable[Key], evict: str = "any") -> None:
        """Start loading ``keys`` (in need order) on the prefetcher thread, as far as room allows. ``evict``:
        "any" for keys known to come (Belady's rule decides), "layer" for predicted ones (room only from their
        own layer's experts: a wrong guess costs that layer alone, not what other layers reuse token after
        token), "none" (free room only)."""
        if self.pool is None:
            return
        with self.lock:
            for key in keys:
                if key in self.resident or key in self.loading:
                    continue
                if not self._make_room(key, self.size(key), demand=False, evict=evict):
                    self.stats.prefetch_skipped += 1
                    break
                self.stats.prefetches += 1
                self.unused.add(key)
                self.loading[key] = self.pool.submit(self._load, key)

    def _make_room(self, key: Key, size: int, demand: bool, evict: str = "any") -> bool:
        """Evict until ``size`` more bytes fit, then reserve them for ``key`` (lock held). On demand, wait for
        in-flight loads or pins to free room; for a prefetch, give up rather than evict anything needed sooner
        or anything ``evict`` rules out."""
        if size > self.budget:
            raise ValueError(f"moefx.offload: one expert ({size} bytes) is larger than the budget ({self.budget} "
                             "bytes); raise budget")
        while self.used + size > self.budget:
            candidates = [k for k in self.resident if not self.pinned[k] and evict != "none"
                          and (evict == "any" or k[0] == key[0])]
            if candidates:
                victim = self.policy.victim(candidates)
                if not demand and not self.policy.sooner(key, victim):
                    return False
                self._evict(victim)
            elif not demand:
                return False
            elif not self.loading and not any(self.pinned[k] for k in self.resident):
                raise RuntimeError("moefx.offload: no room in the budget and nothing to evict")
            else:
                self.lock.wait()
        self.reserved[key] = size
        self.peak = max(self.peak, self.used)
        return True

    def _evict(self, key: Key) -> None:
        del self.resident[key]
        del self.reserved[key]
        self.stats.evictions.append(key)
        if key in self.unused:
            self.unused.discard(key)
            self.stats.wasted += 1

    def _load(self, key: Key) -> Loaded:
        layer, expert = key
        try:
            loaded = self.tier.load(self.layers[layer], expert)
        except BaseException:
            with self.lock:  # give the room back
                self.loading.pop(key, None)
                self.reserved.pop(key, None)
                self.unused.discard(key)
                self.lock.notify_all()
            raise
        with self.lock:
            self.loading.pop(key, None)
            self.resident[key] = loaded
            self.stats.bytes_loaded += loaded.nbytes
            self.lock.notify_all()
        return loaded

    @staticmethod
    def _ready(loaded: Loaded) -> tuple:
        if loaded.event is not None:  # CUDA: the copy ran on the prefetcher's stream
            import torch

            stream = torch.cuda.current_stream()
            stream.wait_event(loaded.event)
            for t in loaded.tensors:
                if t is not None:
                    t.record_stream(stream)
        return loaded.tensors

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
