"""Device helpers shared by the moefx kernels: activations and the zero-computation experts (MoE++)."""
import triton
import triton.language as tl


@triton.jit
def activate(a, ACTIVATION: tl.constexpr):
    """relu | gelu | gelu_tanh | silu | quick_gelu | relu2 of an fp32 tile, as ``moefx.op.ACTIVATIONS``."""
    if ACTIVATION == "relu":
        return tl.maximum(a, 0.0)
    elif ACTIVATION == "gelu":
        return 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # tanh(u) = 2 sigmoid(2u) - 1: exp overflows to inf for very negative u, giving the right limit -1.
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        return 0.5 * a * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0))
    elif ACTIVATION == "quick_gelu":
        return a / (1.0 + tl.exp(-1.702 * a))
    elif ACTIVATION == "relu2":
        r = tl.maximum(a, 0.0)
        return r * r
    else:
        return a / (1.0 + tl.exp(-a))


@triton.jit
def dot(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b; fp32 operands keep IEEE precision (the reference's), half types use tensor cores."""
    if FP32_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def column(matrix, cols, k):
    """Column ``k`` (runtime) of a [rows, cols] tile: Triton tiles have no dynamic indexing."""
    return tl.sum(tl.where(cols[None, :] == k, matrix, 0), axis=1)


@triton.jit
def zero_computation_sum(x_ptr, const_ptr, ids, gates, rows, row_ok, hh, h_ok, stride_x, stride_c,
                         NUM_ROUTED: tl.constexpr, NUM_ZERO: tl.constexpr, NUM_COPY: tl.constexpr,
                         NUM_CHOICES: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k g_k f_k(x[t]) over the copy and constant experts among a row block's choices, [rows, hh] in fp32.

    Zero experts add nothing and routed experts are left to the GEMMs."""
    acc = tl.zeros([rows.shape[0], hh.shape[0]], tl.float32)
    first_copy: tl.constexpr = NUM_ROUTED + NUM_ZERO
    first_const: tl.constexpr = NUM_ROUTED + NUM_ZERO + NUM_COPY
    if NUM_COPY > 0:
        xs = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + hh[None, :],
                     mask=row_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
    kcols = tl.arange(0, BLOCK_K)
    for k in range(TOP_K):
        idk = column(ids, kcols, k)
        gk = column(gates, kcols, k)
        if NUM_COPY > 0:
            is_copy = (idk >= first_copy) & (idk < first_const)
            acc += tl.where(is_copy, gk, 0.0)[:, None] * xs
        if NUM_CHOICES > first_const:
            is_const = (idk >= first_const) & (idk < NUM_CHOICES)
            const = tl.load(const_ptr + (idk - first_const).to(tl.int64)[:, None] * stride_c + hh[None, :],
                            mask=(is_const & row_ok)[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            acc += gk[:, None] * const
    return acc


@triton.jit
def select_experts(logits, col_ok, top_p, gate_scale, NUM_CHOICES: tl.constexpr, TOP_K: tl.constexpr,
                   MIN_K: tl.constexpr, SCORING: tl.constexpr, RENORMALIZE: tl.constexpr, DYNAMIC_K: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Choices ([rows, BLOCK_K] int32) and gates (fp32) from fp32 router logits [rows, BLOCK_E].

    Softmax | sigmoid | unit scoring, top-k (ties to the lower expert id), dynamic-k (Huang et
    al. 2024: keep choice r while r < min_k or the softmax mass before it is < top_p; a dropped
    choice gets gate 0 and id NUM_CHOICES, past every expert), renormalisation, gate_scale."""
    cols = tl.arange(0, logits.shape[1])
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    if SCORING == "softmax" or DYNAMIC_K:
        probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probs = probs / tl.sum(probs, axis=1)[:, None]
    if SCORING == "softmax":
        scores = tl.where(col_ok[None, :], probs, float("-inf"))
    else:  # sigmoid and unit choose by logit (sigmoid scores underflow to equal zeros where logits still rank)
        scores = logits
    # a NaN score (NaN logits; inf ones under softmax) makes the token's gates NaN, as in the reference;
    # it is picked first (torch.topk's order), so that every id stays in range
    nan_row = tl.max(tl.where(col_ok[None, :] & (scores != scores), 1, 0), axis=1) > 0
    scores = tl.where(scores != scores, float("inf"), scores)

    kcols = tl.arange(0, BLOCK_K)
    ids = tl.zeros([logits.shape[0], BLOCK_K], tl.int32)
    gates = tl.zeros([logits.shape[0], BLOCK_K], tl.float32)
    log_gates = tl.full([logits.shape[0], BLOCK_K], float("-inf"), tl.float32)
    mass_before = tl.zeros([logits.shape[0]], tl.float32)
    for k in range(TOP_K):
        best = tl.max(scores, axis=1)
        # ids stay in range even for a row whose scores are all -inf (no tile of picked columns: registers)
        idx = tl.minimum(tl.min(tl.where(scores == best[:, None], cols[None, :], logits.shape[1]), axis=1),
                         NUM_CHOICES - 1)
        hit = cols[None, :] == idx[:, None]
        scores = tl.where(hit, float("-inf"), scores)
        if SCORING == "unit":
            gate = tl.full([logits.shape[0]], 1.0, tl.float32)
        elif SCORING == "sigmoid":
            gate = 1.0 / (1.0 + tl.exp(-best))
        else:
            gate = best
        keep = tl.full([logits.shape[0]], 1, tl.int1)
        if DYNAMIC_K:
            keep = (k < MIN_K) | (mass_before < top_p)
            mass_before += tl.sum(tl.where(hit, probs, 0.0), axis=1)
            gate = tl.where(keep, gate, 0.0)
            idx = tl.where(keep, idx, NUM_CHOICES)
        if SCORING == "sigmoid" and RENORMALIZE:
            chosen = tl.sum(tl.where(hit, logits, 0.0), axis=1)
            log_sigmoid = tl.minimum(chosen, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(chosen)))
            log_gates = tl.where((kcols[None, :] == k) & keep[:, None], log_sigmoid[:, None], log_gates)
        ids = tl.where(kcols[None, :] == k, idx[:, None], ids)
        gates = tl.where(kcols[None, :] == k, gate[:, None], gates)
    if SCORING == "sigmoid" and RENORMALIZE:
        # sigmoid(l) underflows to 0 for very negative fp32 logits: renormalise in log space, as the reference
        weights = tl.exp(log_gates - tl.max(log_gates, axis=1)[:, None])
        gates = weights / tl.sum(weights, axis=1)[:, None]
    elif RENORMALIZE:
        gates = gates / tl.sum(gates, axis=1)[:, None]
    gates = tl.where(nan_row[:, None], float("nan"), gates)
    return ids, gates * gate_scale
