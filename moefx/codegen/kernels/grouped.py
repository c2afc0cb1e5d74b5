"""Grouped expert GEMMs over the expert-sorted slots, for prefill-sized token counts.

Each program owns BLOCK_M sorted rows of one expert and BLOCK_N output columns. The tile's
expert comes from the per-expert counts on the device (tiles of expert e follow those of e - 1),
so there is no host-side alignment step and no padded copy (as in ScatterMoE, Tan et al. 2024).
The grid is sized by the bound ceil(T*top_k / BLOCK_M) + E; programs past the last tile exit.
"""
import triton
import triton.language as tl

from moefx.codegen.kernels.common import activate, dot


@triton.jit
def expert_tile(pid_m, counts_ptr, offsets_ptr, NUM_ROUTED: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """(expert, sorted row ids, valid mask) of the pid_m-th row tile; expert == NUM_ROUTED past the last tile."""
    cols = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + cols, mask=cols < NUM_ROUTED, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    here = cols == expert
    first_tile = tl.sum(tl.where(here, tile_end - tiles, 0), axis=0)
    count = tl.sum(tl.where(here, counts, 0), axis=0)
    offset = tl.sum(tl.where(here, tl.load(offsets_ptr + cols), 0), axis=0)
    in_expert = (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    return expert, offset + in_expert, in_expert < count


@triton.jit
def grouped_up_kernel(
    x_ptr, w_ptr, b_ptr, inter_ptr, sorted_slot_ptr, counts_ptr, offsets_ptr,
    hidden, width, stride_x, stride_we, stride_wn, stride_be, stride_inter,
    NUM_ROUTED: tl.constexpr, TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """inter[r] = act(x[token(r)] @ w_in[e].T + b_in[e]) (gated: act(gate) * up), in sorted row order."""
    expert, rows, row_ok = expert_tile(tl.program_id(0), counts_ptr, offsets_ptr, NUM_ROUTED, BLOCK_E, BLOCK_M)
    if expert >= NUM_ROUTED:
        return
    # The gather happens in the A-load: no permuted copy of x is ever written. Rows past the
    # tile's end and columns past the width are clamped in bounds (their results are never
    # stored), so the K loop masks only the tail of H.
    slots = tl.load(sorted_slot_ptr + rows, mask=row_ok, other=0)
    tokens = (slots // TOP_K).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    # Gated rows interleave: gate j is row 2j, up j is row 2j + 1.
    first_row = (cols % width) * 2 if GATED else cols % width
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_x + kk[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + first_row[None, :] * stride_wn + kk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = kk < hidden - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = dot(a, w, acc, FP32_DOT)
        if GATED:
            w_up = tl.load(w_ptrs + stride_wn, mask=k_ok[:, None], other=0.0)
            acc_up = dot(a, w_up, acc_up, FP32_DOT)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        b_expert = b_ptr + expert.to(tl.int64) * stride_be
        acc += tl.load(b_expert + first_row, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_expert + first_row + 1, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h = activate(acc, ACTIVATION)
    if GATED:
        h = h * acc_up
    tl.store(inter_ptr + rows.to(tl.int64)[:, None] * stride_inter + cols[None, :],
             h.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_down_kernel(
    inter_ptr, w_ptr, b_ptr, gates_ptr, sorted_slot_ptr, counts_ptr, offsets_ptr, out_ptr,
    hidden, width, stride_inter, stride_we, stride_wn, stride_be, stride_out,
    NUM_ROUTED: tl.constexpr, TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    ATOMIC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """g * (inter[r] @ w_out[e].T + b_out[e]), added into out[token] (ATOMIC) or stored at its slot row."""
    expert, rows, row_ok = expert_tile(tl.program_id(0), counts_ptr, offsets_ptr, NUM_ROUTED, BLOCK_E, BLOCK_M)
    if expert >= NUM_ROUTED:
        return
    # Rows past the tile's end read row 0 of the buffer and columns wrap: never stored.
    rows64 = tl.where(row_ok, rows, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + rows64[:, None] * stride_inter + kk[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + (cols % hidden)[None, :] * stride_wn + kk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k_ok = kk < width - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = dot(a, w, acc, FP32_DOT)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert.to(tl.int64) * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    slots = tl.load(sorted_slot_ptr + rows, mask=row_ok, other=0)
    acc = acc * tl.load(gates_ptr + slots, mask=row_ok, other=0.0)[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    if ATOMIC:
        tokens = (slots // TOP_K).to(tl.int64)
        tl.atomic_add(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                      mask=mask, sem="relaxed")
    else:
        tl.store(out_ptr + slots.to(tl.int64)[:, None] * stride_out + cols[None, :], acc, mask=mask)
