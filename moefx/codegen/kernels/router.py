"""Router kernels: logits GEMM, then softmax | sigmoid | unit scoring, top-k, dynamic-k, renormalisation.

``router_kernel`` (grouped path) gives each program a block of tokens and writes, besides the
choices and gates, each choice's rank among its block's tokens routed to the same expert and the
block's per-expert counts (so the permutation needs no atomics and no zeroed buffer), and, for
the atomic combine, the output's initial value: the zero-computation experts' share (MoE++,
Jin et al. 2024). ``router_logits_kernel`` (decode path) spreads the router's weight rows over
many programs and writes only logits; the decode kernels select experts from them.
"""
import triton
import triton.language as tl

from moefx.codegen.kernels.common import column, select_experts, zero_computation_sum


@triton.jit(do_not_specialize=["num_tokens", "top_p", "gate_scale"])
def router_kernel(
    r_ptr, w_ptr, b_ptr, x_ptr, const_ptr, out_ptr, ids_ptr, gates_ptr, rank_ptr, block_counts_ptr,
    num_tokens, hidden_r, hidden, stride_r, stride_w, stride_x, stride_c, stride_out, top_p, gate_scale,
    NUM_ROUTED: tl.constexpr, NUM_ZERO: tl.constexpr, NUM_COPY: tl.constexpr, NUM_CHOICES: tl.constexpr,
    TOP_K: tl.constexpr, MIN_K: tl.constexpr, SCORING: tl.constexpr, RENORMALIZE: tl.constexpr,
    DYNAMIC_K: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, INIT_OUT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < NUM_CHOICES

    logits = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for h0 in range(0, hidden_r, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_ok = hh < hidden_r
        a = tl.load(r_ptr + rows64[:, None] * stride_r + hh[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w + hh[:, None], mask=col_ok[None, :] & h_ok[:, None], other=0.0)
        if FP32_DOT:
            logits = tl.dot(a.to(tl.float32), w.to(tl.float32), logits, input_precision="ieee")
        else:
            # Half operands: their products are exact in fp32 and the dot accumulates in fp32.
            logits = tl.dot(a, w, logits)
    if HAS_BIAS:
        logits += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    ids, gates = select_experts(logits, col_ok, top_p, gate_scale, NUM_CHOICES, TOP_K, MIN_K, SCORING, RENORMALIZE,
                                DYNAMIC_K, BLOCK_K)

    kcols = tl.arange(0, BLOCK_K)
    k_ok = row_ok[:, None] & (kcols < TOP_K)[None, :]
    slot_offsets = rows64[:, None] * TOP_K + kcols[None, :]
    tl.store(ids_ptr + slot_offsets, ids, mask=k_ok)
    tl.store(gates_ptr + slot_offsets, gates, mask=k_ok)

    # Per-expert counts of this block and each choice's rank among them: an exclusive scan over
    # the block's one-hot choice matrix (a token picks an expert at most once).
    onehot = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
    for k in range(TOP_K):
        idk = column(ids, kcols, k)
        onehot += ((cols[None, :] == idk[:, None]) & (idk < NUM_ROUTED)[:, None] & row_ok[:, None]).to(tl.int32)
    tl.store(block_counts_ptr + pid * BLOCK_E + cols, tl.sum(onehot, axis=0))
    before = tl.cumsum(onehot, axis=0) - onehot
    rank = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for k in range(TOP_K):
        idk = column(ids, kcols, k)
        rank_k = tl.sum(tl.where(cols[None, :] == idk[:, None], before, 0), axis=1)
        rank = tl.where(kcols[None, :] == k, rank_k[:, None], rank)
    tl.store(rank_ptr + slot_offsets, rank, mask=k_ok)

    if INIT_OUT:
        for x0 in range(0, hidden, BLOCK_X):
            hh = x0 + tl.arange(0, BLOCK_X)
            h_ok = hh < hidden
            init = zero_computation_sum(x_ptr, const_ptr, ids, gates, rows, row_ok, hh, h_ok, stride_x, stride_c,
                                        NUM_ROUTED, NUM_ZERO, NUM_COPY, NUM_CHOICES, TOP_K, BLOCK_K)
            tl.store(out_ptr + rows64[:, None] * stride_out + hh[None, :], init.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & h_ok[None, :])


@triton.jit(do_not_specialize=["num_tokens"])
def router_logits_kernel(
    r_ptr, w_ptr, b_ptr, logits_ptr, num_tokens, hidden_r, stride_r, stride_w, stride_logits,
    NUM_CHOICES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """logits[t, rows] = router_input[t] @ w_router[rows].T + b_router[rows] in fp32, for a few tokens."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < NUM_CHOICES
    for t in range(num_tokens):
        acc = tl.zeros([BLOCK_R, BLOCK_H], tl.float32)
        for h0 in range(0, hidden_r, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            h_ok = hh < hidden_r
            r = tl.load(r_ptr + t * stride_r + hh, mask=h_ok, other=0.0).to(tl.float32)
            acc += tl.load(w_ptr + rows[:, None] * stride_w + hh[None, :], mask=row_ok[:, None] & h_ok[None, :],
                           other=0.0).to(tl.float32) * r[None, :]
        logits = tl.sum(acc, axis=1)
        if HAS_BIAS:
            logits += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(logits_ptr + t * stride_logits + rows, logits, mask=row_ok)
