"""Expert offloading: experts on a slow tier, a byte budget of them in fast memory, fetched ahead by known
or predicted routing (``runtime``), plus routing analysis for offloading (``analysis``)."""
from moefx.offload.analysis import (RoutingConsistency, routing_consistency, segment_cache_best_hit_rate,
                                     segment_routing_best_performance)
from moefx.offload.cache import CacheStats, ExpertCache
from moefx.offload.policy import LFU, LRU, Belady
from moefx.offload.predict import layer_ahead_recall, routing_trace
from moefx.offload.runtime import Offloaded, OffloadConfig, OffloadedMoELayer, offload

__all__ = ["Belady", "CacheStats", "ExpertCache", "LFU", "LRU", "OffloadConfig", "Offloaded", "OffloadedMoELayer",
           "RoutingConsistency", "layer_ahead_recall", "offload", "routing_consistency", "routing_trace",
           "segment_cache_best_hit_rate", "segment_routing_best_performance"]
