"""moefx.offload: offloaded models give the all-in-memory model's outputs bit for bit (every CPU strategy,
policy and budget, converted or loaded from a checkpoint), the cache never holds more than its budget,
Belady's rule evicts as the textbook optimum on a known sequence, and pre-gating leaves nothing to load on
demand."""
from __future__ import annotations

import pytest
import torch

import moefx
import moefx.cpu
from moefx.layer import MoELayer
from moefx.offload import Belady, ExpertCache, LRU, OffloadConfig, offload
from moefx.offload.store import Loaded
from tests.test_onnx_models import token_batch
from tests.test_pregate import VOCAB, tiny_llama


@pytest.fixture(scope="module")
def calibration():
    return [token_batch(8, 16, seed) for seed in range(2)]


def converted(calibration, **options):
    return moefx.convert(tiny_llama(), num_experts=8, top_k=2, calibration=calibration, progress=False, **options)


def run(model, batches):
    with torch.no_grad():
        return [model(**b).last_hidden_state for b in batches]


def unpadded(batch, seq, seed):
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# prefill (grouped GEMMs), one-token decode steps (pairs); masks as in calibration (pre-gated blocks need them)
BATCHES = [token_batch(3, 11, seed=9), unpadded(1, 1, seed=1), unpadded(2, 1, seed=2)]


@pytest.mark.parametrize("policy,budget,prefetch", [("belady", "1x", "auto"), ("belady", "2x", "auto"),
                                                    ("lru", "4x", "none"), ("lfu", "2x", "layer_ahead")])
@pytest.mark.parametrize("per_expert", [False, True], ids=["pairs+grouped", "per_expert"])
def test_offloaded_outputs_are_bitwise_those_of_the_model_in_memory(calibration, monkeypatch, policy, budget,
                                                                    prefetch, per_expert):
    if per_expert:  # large-batch strategy on a small batch
        monkeypatch.setitem(moefx.cpu.CROSSOVERS, "grouped_max_rows_per_expert", 0)
    moe = converted(calibration)
    want = run(moe, BATCHES)
    with offload(moe, policy=policy, budget=budget, prefetch=prefetch) as runtime:
        assert all(p.device.type == "meta" for m in moe.modules() if isinstance(m, MoELayer) for p in (m.w_in, m.w_out))
        got = run(moe, BATCHES)
        assert runtime.cache.peak <= runtime.budget
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_exact_with_biases_shared_and_zero_computation_experts():
    from tests.conftest import _gpt2

    torch.manual_seed(0)
    dense, make, _, _ = _gpt2()
    g = torch.Generator().manual_seed(0)
    moe = moefx.convert(dense.eval(), num_experts=8, top_k=2, num_shared=1, num_zero=1, num_copy=1, num_const=1,
                        router="least_squares", calibration=[make(g) for _ in range(2)], progress=False)
    layer = next(m for m in moe.modules() if isinstance(m, MoELayer))
    assert layer.b_in is not None and layer.shared_in is not None and layer.const_experts is not None
    batches = [make(g), {"input_ids": torch.randint(0, 200, (1, 1))}]
    with torch.no_grad():
        want = [moe(**b).last_hidden_state for b in batches]
        with offload(moe, budget="1x"):
            got = [moe(**b).last_hidden_state for b in batches]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_saved_checkpoint_is_the_slow_tier(calibration, tmp_path):
    moefx.save_pretrained(converted(calibration), str(tmp_path))
    loaded = moefx.load_pretrained(str(tmp_path))
    want = run(loaded, BATCHES)
    with offload(loaded, source=str(tmp_path), budget="2x") as runtime:
        got = run(loaded, BATCHES)
        assert runtime.stats.bytes_loaded > 0
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_pregated_model_loads_nothing_on_demand_and_stays_exact(calibration):
    moe = converted(calibration, router="distilled", pregate="block")
    batches = [token_batch(3, 11, seed=9), token_batch(2, 1, seed=3)]  # padded, as traced
    want = run(moe, batches)
    with offload(moe, budget="2x", prefetch="pregate") as runtime:
        got = run(moe, batches)
        assert runtime.stats.misses == 0  # every expert was fetched at block entry, before the attention
        assert runtime.stats.requests == runtime.stats.hits + runtime.stats.late > 0
    for a, b in zip(got, want):
        assert torch.equal(a, b)


class UnitTier:
    """A slow tier of one-byte experts (key (0, v)), for cache tests."""

    def source(self, layer, expert):
        return (torch.zeros(1, dtype=torch.uint8), None, None, None)

    def load(self, layer, expert):
        return Loaded((torch.full((1,), expert, dtype=torch.uint8), None, None, None), 1)


def replay(policy, sequence, capacity, known_future):
    cache = ExpertCache(UnitTier(), ["layer"], capacity, policy, prefetch_thread=False)
    for t, v in enumerate(sequence):
        if known_future:
            policy.expect([(0, u) for u in sequence[t:]])
        assert int(cache.get((0, v))[0]) == v
        assert cache.used <= capacity
    return cache.stats


TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]  # Silberschatz's reference string


def test_belady_evicts_the_farthest_next_use_on_a_known_sequence():
    stats = replay(Belady(), TEXTBOOK, 3, known_future=True)
    assert [v for _, v in stats.evictions] == [7, 1, 0, 4, 3, 2]  # worked by hand: OPT's 9 faults
    assert stats.misses == 9
    assert replay(LRU(), TEXTBOOK, 3, known_future=False).misses == 12


def test_belady_evicts_experts_not_known_to_come_first_least_recent_first():
    policy = Belady()
    for key in [(0, 1), (1, 1), (2, 5), (0, 2)]:
        policy.touch(key)
    policy.expect([(2, 5), (1, 1)])
    order = sorted([(0, 1), (1, 1), (2, 5), (0, 2)], key=policy.rank)
    assert order == [(0, 1), (0, 2), (1, 1), (2, 5)]


def test_prefetch_never_evicts_what_is_needed_sooner_nor_exceeds_the_budget():
    policy = Belady()
    cache = ExpertCache(UnitTier(), ["layer"], 2, policy)
    policy.expect([(0, 1), (0, 2)])
    cache.prefetch([(0, 1), (0, 2)])
    cache.get((0, 1)), cache.get((0, 2))
    policy.expect([(0, 2), (0, 3)])  # 1 is no longer wanted, 2 is wanted before 3
    cache.prefetch([(0, 3), (0, 4)])
    cache.close()
    assert set(cache.resident) == {(0, 2), (0, 3)} and list(cache.stats.evictions) == [(0, 1)]
    assert cache.stats.prefetch_skipped == 1 and cache.peak <= 2


def test_a_guess_evicts_only_its_own_layer_and_nothing_when_told_so():
    policy = LRU()
    cache = ExpertCache(UnitTier(), ["a", "b"], 2, policy)
    cache.get((0, 1)), cache.get((1, 1))
    cache.prefetch([(1, 2)], evict="none")  # full: a guess that may not evict is not started
    cache.prefetch([(1, 3)], evict="layer")  # evicts layer 1's expert, though layer 0's is older
    cache.close()
    assert list(cache.stats.evictions) == [(1, 1)] and set(cache.resident) == {(0, 1), (1, 3)}
    assert cache.stats.prefetch_skipped == 1


def test_options_are_checked_with_the_fix_named(calibration):
    with pytest.raises(ValueError, match="budget='two'"):
        OffloadConfig(budget="two")
    with pytest.raises(ValueError, match="policy='mru'"):
        OffloadConfig(policy="mru")
    with pytest.raises(ValueError, match="pregate='block'"):
        offload(converted(calibration), prefetch="pregate")
    with pytest.raises(ValueError, match="larger than the budget"):
        with offload(converted(calibration), budget=16) as runtime:
            run(runtime.model, BATCHES[1:2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_experts_come_from_pinned_memory_and_match_the_cpu_implementation(calibration, monkeypatch):
    # the offloaded layer computes with moefx.cpu's torch code on the GPU: equal to the model in memory run
    # through the same implementation (MOEFX_KERNELS=cpu), within tolerance of the Triton path
    moe = converted(calibration).cuda()
    batches = [{k: v.cuda() for k, v in b.items()} for b in BATCHES]
    want_triton = run(moe, batches)
    monkeypatch.setenv("MOEFX_KERNELS", "cpu")
    want = run(moe, batches)
    with offload(moe, budget="2x") as runtime:
        assert runtime.tier.stream is not None and all(t.is_pinned() for p in runtime.tier.pinned.values()
                                                       for t in p if t is not None)
        got = run(moe, batches)
        torch.cuda.synchronize()
        assert runtime.cache.peak <= runtime.budget
    for a, b, c in zip(got, want, want_triton):
        assert torch.equal(a, b)
        assert (a - c).abs().max() <= 1e-4 * c.abs().max()
