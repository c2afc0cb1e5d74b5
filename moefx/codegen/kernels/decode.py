"""Decode path for a few tokens: per-slot GEMVs with no permutation and no alignment.

At decode the time goes to streaming the chosen experts' weights once, so every (slot, column
block) and every (token, column block) is its own program, with column blocks narrow enough to
keep every SM busy. Each program selects its token's experts from the router logits itself
(a few hundred values), which saves a launch. The down kernel walks a token's choices in order,
adds the zero-computation experts and writes y directly: deterministic, no atomics, no combine.
"""
import triton
import triton.language as tl

from moefx.codegen.kernels.common import activate, column, select_experts, zero_computation_sum


@triton.jit
def token_choices(logits_ptr, token, stride_logits, top_p, gate_scale, NUM_CHOICES: tl.constexpr,
                  TOP_K: tl.constexpr, MIN_K: tl.constexpr, SCORING: tl.constexpr, RENORMALIZE: tl.constexpr,
                  DYNAMIC_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """(ids, gates), each [1, BLOCK_K], of one token, from its row of router logits."""
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < NUM_CHOICES
    logits = tl.load(logits_ptr + token * stride_logits + cols, mask=col_ok, other=0.0)[None, :]
    return select_experts(logits, col_ok, top_p, gate_scale, NUM_CHOICES, TOP_K, MIN_K, SCORING, RENORMALIZE,
                          DYNAMIC_K, BLOCK_K)


@triton.jit(do_not_specialize=["num_tokens", "top_p", "gate_scale"])
def decode_up_kernel(
    x_ptr, w_ptr, b_ptr, logits_ptr, inter_ptr, num_tokens, top_p, gate_scale,
    hidden, width, stride_x, stride_we, stride_wn, stride_be, stride_logits, stride_inter,
    NUM_ROUTED: tl.constexpr, NUM_CHOICES: tl.constexpr, TOP_K: tl.constexpr, MIN_K: tl.constexpr,
    SCORING: tl.constexpr, RENORMALIZE: tl.constexpr, DYNAMIC_K: tl.constexpr, ACTIVATION: tl.constexpr,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K_CHOICES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """inter[slot] = act(x[t] @ w_in[e].T + b_in[e]) for slot t * top_k + k, in slot order."""
    slot = tl.program_id(0)
    token = slot // TOP_K
    ids, _ = token_choices(logits_ptr, token, stride_logits, top_p, gate_scale, NUM_CHOICES, TOP_K, MIN_K, SCORING,
                           RENORMALIZE, DYNAMIC_K, BLOCK_E, BLOCK_K_CHOICES)
    expert = tl.sum(column(ids, tl.arange(0, BLOCK_K_CHOICES), slot % TOP_K), axis=0)
    if expert < NUM_ROUTED:
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
        tl.store(inter_ptr + slot * stride_inter + cols, h.to(inter_ptr.dtype.element_ty), mask=col_ok)


@triton.jit(do_not_specialize=["num_tokens", "top_p", "gate_scale"])
def decode_down_kernel(
    inter_ptr, w_ptr, b_ptr, logits_ptr, x_ptr, const_ptr, out_ptr, num_tokens, top_p, gate_scale,
    hidden, width, stride_inter, stride_we, stride_wn, stride_be, stride_logits, stride_x, stride_c, stride_out,
    NUM_ROUTED: tl.constexpr, NUM_ZERO: tl.constexpr, NUM_COPY: tl.constexpr, NUM_CHOICES: tl.constexpr,
    TOP_K: tl.constexpr, MIN_K: tl.constexpr, SCORING: tl.constexpr, RENORMALIZE: tl.constexpr,
    DYNAMIC_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K_CHOICES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[t] = sum_k g_k f_k(x[t]) over token t's choices, in choice order."""
    token = tl.program_id(0)
    ids, gates = token_choices(logits_ptr, token, stride_logits, top_p, gate_scale, NUM_CHOICES, TOP_K, MIN_K,
                               SCORING, RENORMALIZE, DYNAMIC_K, BLOCK_E, BLOCK_K_CHOICES)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    one_row = token + tl.arange(0, 1)
    y = tl.sum(zero_computation_sum(x_ptr, const_ptr, ids, gates, one_row, one_row < num_tokens, cols, col_ok,
                                    stride_x, stride_c, NUM_ROUTED, NUM_ZERO, NUM_COPY, NUM_CHOICES, TOP_K,
                                    BLOCK_K_CHOICES), axis=0)
    kcols = tl.arange(0, BLOCK_K_CHOICES)
    for k in range(TOP_K):
        expert = tl.sum(column(ids, kcols, k), axis=0)
        if expert < NUM_ROUTED:
            slot = token * TOP_K + k
            w_expert = w_ptr + expert.to(tl.int64) * stride_we
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for k0 in range(0, width, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_in = kk < width
                h = tl.load(inter_ptr + slot * stride_inter + kk, mask=k_in, other=0.0).to(tl.float32)
                acc += tl.load(w_expert + cols[:, None] * stride_wn + kk[None, :], mask=col_ok[:, None] & k_in[None, :],
                               other=0.0) * h[None, :]
            f = tl.sum(acc, axis=1)
            if HAS_BIAS:
                f += tl.load(b_ptr + expert.to(tl.int64) * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)
            y += tl.sum(column(gates, kcols, k), axis=0) * f
    tl.store(out_ptr + token * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)
