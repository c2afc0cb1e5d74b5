"""Deterministic combine: y[t] = zero-computation share + sum over k of the slot rows, in choice order.

Used instead of the down kernel's float atomics when
``torch.use_deterministic_algorithms(True)`` is on; it costs one extra launch and a
[T * top_k, H] fp32 buffer.
"""
import triton
import triton.language as tl

from moefx.codegen.kernels.common import column, zero_computation_sum


@triton.jit(do_not_specialize=["num_tokens"])
def combine_kernel(
    slot_out_ptr, ids_ptr, gates_ptr, x_ptr, const_ptr, out_ptr, num_tokens, hidden,
    stride_slot, stride_x, stride_c, stride_out,
    NUM_ROUTED: tl.constexpr, NUM_ZERO: tl.constexpr, NUM_COPY: tl.constexpr, NUM_CHOICES: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    rows64 = rows.to(tl.int64)
    hh = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    h_ok = hh < hidden
    kcols = tl.arange(0, BLOCK_K)
    slot_offsets = rows64[:, None] * TOP_K + kcols[None, :]
    k_ok = row_ok[:, None] & (kcols < TOP_K)[None, :]
    ids = tl.load(ids_ptr + slot_offsets, mask=k_ok, other=NUM_CHOICES)
    gates = tl.load(gates_ptr + slot_offsets, mask=k_ok, other=0.0)
    y = zero_computation_sum(x_ptr, const_ptr, ids, gates, rows, row_ok, hh, h_ok, stride_x, stride_c,
                             NUM_ROUTED, NUM_ZERO, NUM_COPY, NUM_CHOICES, TOP_K, BLOCK_K)
    for k in range(TOP_K):
        routed = column(ids, kcols, k) < NUM_ROUTED
        y += tl.load(slot_out_ptr + (rows64 * TOP_K + k)[:, None] * stride_slot + hh[None, :],
                     mask=(routed & row_ok)[:, None] & h_ok[None, :], other=0.0)
    tl.store(out_ptr + rows64[:, None] * stride_out + hh[None, :], y.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & h_ok[None, :])
