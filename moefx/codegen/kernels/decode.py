"""Decode path for a few tokens: per-slot GEMVs with no permutation and no alignment.

At decode the time goes to streaming the chosen experts' weights once, so every (slot, column
block) and every (token, column block) is its own program, with column blocks narrow enough to
keep every SM busy; the down kernel walks a token's choices in order, adds the
zero-computation experts and writes y directly: deterministic, no atomics, no combine launch.
"""
import triton
import triton.language as tl

from moefx.codegen.kernels.common import activate, zero_computation_sum


@triton.jit(do_not_specialize=["num_tokens"])
def decode_up_kernel(
    x_ptr, w_ptr, b_ptr, ids_ptr, inter_ptr, num_tokens,
    hidden, width, stride_x, stride_we, stride_wn, stride_be, stride_inter,
    NUM_ROUTED: tl.constexpr, TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """inter[slot] = act(x[t] @ w_in[e].T + b_in[e]) for slot t * top_k + k, in slot order."""
    slot = tl.program_id(0)
    expert = tl.load(ids_ptr + slot)
    if expert < NUM_ROUTED:
        token = (slot // TOP_K).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < width
        first_row = cols * 2 if GATED else cols
        w_expert = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < hidden
            xk = tl.load(x_ptr + token * stride_x + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            w_mask = col_ok[:, None] & k_ok[None, :]
            acc += tl.load(w_expert + first_row[:, None] * stride_wn + kk[None, :], mask=w_mask, other=0.0) * xk
            if GATED:
                acc_up += tl.load(w_expert + (first_row + 1)[:, None] * stride_wn + kk[None, :], mask=w_mask,
                                  other=0.0) * xk
        a = tl.sum(acc, axis=1)
        if HAS_BIAS:
            a += tl.load(b_ptr + expert.to(tl.int64) * stride_be + first_row, mask=col_ok, other=0.0).to(tl.float32)
        h = activate(a, ACTIVATION)
        if GATED:
            up = tl.sum(acc_up, axis=1)
            if HAS_BIAS:
                up += tl.load(b_ptr + expert.to(tl.int64) * stride_be + first_row + 1, mask=col_ok,
                              other=0.0).to(tl.float32)
            h = h * up
        tl.store(inter_ptr + slot.to(tl.int64) * stride_inter + cols, h.to(inter_ptr.dtype.element_ty), mask=col_ok)


@triton.jit(do_not_specialize=["num_tokens"])
def decode_down_kernel(
    inter_ptr, w_ptr, b_ptr, ids_ptr, gates_ptr, x_ptr, const_ptr, out_ptr, num_tokens,
    hidden, width, stride_inter, stride_we, stride_wn, stride_be, stride_x, stride_c, stride_out,
    NUM_ROUTED: tl.constexpr, NUM_ZERO: tl.constexpr, NUM_COPY: tl.constexpr, NUM_CHOICES: tl.constexpr,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
):
    """y[t] = sum_k g_k f_k(x[t]) over token t's choices, in choice order."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    one_row = token + tl.arange(0, 1)
    kcols = tl.arange(0, BLOCK_TOPK)
    k_ok = kcols < TOP_K
    ids = tl.load(ids_ptr + one_row[:, None] * TOP_K + kcols[None, :], mask=k_ok[None, :], other=NUM_CHOICES)
    gates = tl.load(gates_ptr + one_row[:, None] * TOP_K + kcols[None, :], mask=k_ok[None, :], other=0.0)
    y = tl.sum(zero_computation_sum(x_ptr, const_ptr, ids, gates, one_row, one_row < num_tokens, cols, col_ok,
                                    stride_x, stride_c, NUM_ROUTED, NUM_ZERO, NUM_COPY, NUM_CHOICES, TOP_K,
                                    BLOCK_TOPK), axis=0)
    for k in range(TOP_K):
        slot = token * TOP_K + k
        expert = tl.load(ids_ptr + slot)
        if expert < NUM_ROUTED:
            w_expert = w_ptr + expert.to(tl.int64) * stride_we
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for k0 in range(0, width, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_in = kk < width
                h = tl.load(inter_ptr + slot.to(tl.int64) * stride_inter + kk, mask=k_in, other=0.0).to(tl.float32)
                acc += tl.load(w_expert + cols[:, None] * stride_wn + kk[None, :], mask=col_ok[:, None] & k_in[None, :],
                               other=0.0) * h[None, :]
            f = tl.sum(acc, axis=1)
            if HAS_BIAS:
                f += tl.load(b_ptr + expert.to(tl.int64) * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)
            y += tl.load(gates_ptr + slot) * f
    tl.store(out_ptr + token.to(tl.int64) * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)
