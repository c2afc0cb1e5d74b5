"""Permutation kernel: per-expert offsets and the slot map sorted by expert, all on the GPU.

Row ``offset[e] + (choices of e in earlier router blocks) + rank`` of the sorted order holds
slot t * top_k + k. Every input comes from the router kernel, so nothing syncs with the host
and the launch is CUDA-graph safe; the order is stable, as ``argsort(stable=True)`` in the
reference.
"""
import triton
import triton.language as tl

from moefx.codegen.kernels.common import column


@triton.jit(do_not_specialize=["num_tokens", "num_blocks"])
def permute_kernel(
    ids_ptr, rank_ptr, block_counts_ptr, sorted_slot_ptr, expert_counts_ptr, expert_offsets_ptr,
    num_tokens, num_blocks,
    NUM_ROUTED: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    totals = tl.zeros([BLOCK_E], tl.int32)
    before = tl.zeros([BLOCK_E], tl.int32)
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        counts = tl.load(block_counts_ptr + blocks[:, None] * BLOCK_E + cols[None, :],
                         mask=(blocks < num_blocks)[:, None], other=0)
        totals += tl.sum(counts, axis=0)
        before += tl.sum(tl.where((blocks < pid)[:, None], counts, 0), axis=0)
    offsets = tl.cumsum(totals, axis=0) - totals
    if pid == 0:
        tl.store(expert_counts_ptr + cols, totals)
        tl.store(expert_offsets_ptr + cols, offsets)
    base = offsets + before

    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    kcols = tl.arange(0, BLOCK_K)
    slot_offsets = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
    k_ok = row_ok[:, None] & (kcols < TOP_K)[None, :]
    ids = tl.load(ids_ptr + slot_offsets, mask=k_ok, other=BLOCK_E)
    rank = tl.load(rank_ptr + slot_offsets, mask=k_ok, other=0)
    for k in range(TOP_K):
        idk = column(ids, kcols, k)
        position = tl.sum(tl.where(cols[None, :] == idk[:, None], base[None, :], 0), axis=1) + column(rank, kcols, k)
        tl.store(sorted_slot_ptr + position, rows * TOP_K + k, mask=row_ok & (idk < NUM_ROUTED))
