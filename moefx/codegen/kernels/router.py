"""Router kernel: logits GEMM, softmax | sigmoid | unit scoring, top-k, dynamic-k, renormalisation.

One program per block of tokens. Besides the choices it writes, for the grouped path, each
choice's rank among its block's tokens routed to the same expert and the block's per-expert
counts (so the permutation needs no atomics and no zeroed buffer), and, for the atomic combine,
the output's initial value: the zero-computation experts' share (MoE++, Jin et al. 2024).
Dynamic-k follows Huang et al. 2024 ("Harder Tasks Need More Experts").
"""
import triton
import triton.language as tl

from moefx.codegen.kernels.common import column, zero_computation_sum


@triton.jit(do_not_specialize=["num_tokens", "top_p", "gate_scale"])
def router_kernel(
    r_ptr, w_ptr, b_ptr, x_ptr, const_ptr, out_ptr, ids_ptr, gates_ptr, rank_ptr, block_counts_ptr,
    num_tokens, hidden_r, hidden, stride_r, stride_w, stride_x, stride_c, stride_out, top_p, gate_scale,
    NUM_ROUTED: tl.constexpr, NUM_ZERO: tl.constexpr, NUM_COPY: tl.constexpr, NUM_CHOICES: tl.constexpr,
    TOP_K: tl.constexpr, MIN_K: tl.constexpr, SCORING: tl.constexpr, RENORMALIZE: tl.constexpr,
    DYNAMIC_K: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, WRITE_RANK: tl.constexpr,
    INIT_OUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_X: tl.constexpr,
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
    logits = tl.where(col_ok[None, :], logits, float("-inf"))

    if SCORING == "softmax" or DYNAMIC_K:
        probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probs = probs / tl.sum(probs, axis=1)[:, None]
    if SCORING == "softmax":
        scores = tl.where(col_ok[None, :], probs, float("-inf"))
    elif SCORING == "sigmoid":
        scores = tl.where(col_ok[None, :], 1.0 / (1.0 + tl.exp(-logits)), float("-inf"))
    else:
        scores = logits

    kcols = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    gates = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    onehot = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
    mass_before = tl.zeros([BLOCK_T], tl.float32)
    for k in range(TOP_K):
        best = tl.max(scores, axis=1)
        idx = tl.min(tl.where(scores == best[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == idx[:, None]
        scores = tl.where(hit, float("-inf"), scores)
        if SCORING == "unit":
            gate = tl.full([BLOCK_T], 1.0, tl.float32)
        else:
            gate = best
        if DYNAMIC_K:
            keep = (k < MIN_K) | (mass_before < top_p)
            mass_before += tl.sum(tl.where(hit, probs, 0.0), axis=1)
            gate = tl.where(keep, gate, 0.0)
            # A dropped choice points past every expert, so no stage computes it.
            idx = tl.where(keep, idx, NUM_CHOICES)
        ids = tl.where(kcols[None, :] == k, idx[:, None], ids)
        gates = tl.where(kcols[None, :] == k, gate[:, None], gates)
        if WRITE_RANK:
            onehot += (hit & (idx < NUM_ROUTED)[:, None] & row_ok[:, None]).to(tl.int32)
    if RENORMALIZE:
        gates = gates / tl.sum(gates, axis=1)[:, None]
    gates = gates * gate_scale

    k_ok = row_ok[:, None] & (kcols < TOP_K)[None, :]
    slot_offsets = rows64[:, None] * TOP_K + kcols[None, :]
    tl.store(ids_ptr + slot_offsets, ids, mask=k_ok)
    tl.store(gates_ptr + slot_offsets, gates, mask=k_ok)

    if WRITE_RANK:
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
