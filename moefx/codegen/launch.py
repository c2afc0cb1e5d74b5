"""Launch wrappers: buffers, grids and configs for the moefx kernels; ``moe_triton`` runs the op.

Launches, none of them preceded by a host sync (CUDA-graph safe):
  decode  (T <= decode_max_tokens): router_logits -> decode_up -> decode_down (each program selects its
           token's experts from the logits; combine fused, deterministic)
  grouped: router -> permute -> grouped_up -> grouped_down (float atomics into y, initialised by the router)
  grouped, ``torch.use_deterministic_algorithms(True)``: ... -> grouped_down (slot rows) -> combine
Kernels go through ``torch.library.wrap_triton`` so that the ``moefx::moe_triton`` op traces them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from moefx.codegen import tuning
from moefx.codegen.kernels.combine import combine_kernel
from moefx.codegen.kernels.decode import decode_down_kernel, decode_up_kernel
from moefx.codegen.kernels.grouped import grouped_down_kernel, grouped_up_kernel
from moefx.codegen.kernels.permute import permute_kernel
from moefx.codegen.kernels.router import router_kernel, router_logits_kernel
from moefx.op import MoEAttrs, MoEInputs, interleaved, moe_reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Launch:
    """One kernel launch: kernel, grid, arguments (constexprs and num_warps/num_stages as keywords)."""
    kernel: Callable
    grid: tuple
    args: tuple
    kwargs: dict


def _contiguous_rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """Kernels assume unit stride along the last dimension; copy only tensors that break it."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _launch_options(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}


def _decode_block_n(cfg: dict, rows: int, width: int, multiprocessors: int) -> int:
    """Widest column block (within the table's range) that still gives every SM its share of programs."""
    narrowest, widest = cfg["BLOCK_N"]
    wanted = cfg["programs_per_sm"] * multiprocessors
    block = widest
    while block > narrowest and rows * triton.cdiv(width, block) < wanted:
        block //= 2
    return block


def moe_triton(inputs: MoEInputs, attrs: MoEAttrs) -> Tensor:
    """``torch.ops.moefx.moe`` through the generated Triton kernels (same arguments, same result)."""
    if inputs.x.dtype == torch.float64:
        # fp64 is the gradcheck/reference dtype; the kernels are specialised for fp32 and half types.
        return moe_reference(inputs, attrs)
    # the kernels read interleaved gate/up rows; the compile pass keeps that layout on CUDA graphs, so this copy
    # is for ops built with halves by hand
    inputs, attrs = interleaved(inputs, attrs)
    out, launches = plan(inputs, attrs)
    for step in launches:
        wrap_triton(step.kernel)[step.grid](*step.args, **step.kwargs)
    return out


def plan(inputs: MoEInputs, attrs: MoEAttrs, kind: Optional[str] = None, multiprocessors: Optional[int] = None
         ) -> tuple[Tensor, list[Launch]]:
    """The output buffer and the launches that fill it, in order; nothing runs.

    ``kind`` and ``multiprocessors`` override the device's tuning-table key and SM count (to plan
    for a GPU that is not here, e.g. compiling for sm90 on a CPU)."""
    x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const_experts = inputs
    top_k, activation, gated, scoring = attrs.top_k, attrs.activation, attrs.gated, attrs.scoring
    renormalize, top_p, min_k, gate_scale = attrs.renormalize, attrs.top_p, attrs.min_k, attrs.gate_scale
    num_zero, num_copy = attrs.num_zero, attrs.num_copy
    if x.dtype not in KERNEL_DTYPES or w_in.dtype != x.dtype or w_out.dtype != x.dtype:
        raise ValueError(f"moefx Triton kernels need x, w_in and w_out in one of {KERNEL_DTYPES}, got "
                         f"{x.dtype}, {w_in.dtype}, {w_out.dtype}; cast the experts to x's dtype")
    num_tokens, hidden = x.shape
    num_routed, f_in, _ = w_in.shape
    width = w_out.shape[2]
    num_choices = w_router.shape[0]
    if f_in * hidden >= 2 ** 31 or hidden * width >= 2 ** 31:
        raise ValueError(f"one expert's weight matrix has {max(f_in * hidden, hidden * width)} elements; the "
                         "kernels index within an expert in 32 bits, so split the expert below 2**31 elements")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out, []
    x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const_experts = map(
        _contiguous_rows, (x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const_experts))
    device = x.device
    kind = kind or tuning.device_kind(device)
    multiprocessors = multiprocessors or tuning.multiprocessor_count(device)
    cfg = tuning.stage_configs(kind, (hidden, width, num_routed, top_k), num_tokens)
    launches = []

    def launch(kernel, grid, *args, **kwargs):
        launches.append(Launch(kernel, grid, args, kwargs))

    decode = num_tokens <= cfg["decode_max_tokens"]
    atomic = not decode and not torch.are_deterministic_algorithms_enabled()
    num_slots = num_tokens * top_k
    block_e = max(16, triton.next_power_of_2(num_choices))
    block_k = triton.next_power_of_2(top_k)
    fp32_dot = x.dtype == torch.float32
    # Absent optional tensors: the constexpr flags keep the kernels from touching the stand-in.
    b_router_, b_in_, b_out_, const_ = (x if t is None else t for t in (b_router, b_in, b_out, const_experts))
    stride_c, stride_b_in, stride_b_out = (0 if t is None else t.stride(0) for t in (const_experts, b_in, b_out))
    zero_computation = dict(NUM_ROUTED=num_routed, NUM_ZERO=num_zero, NUM_COPY=num_copy)
    routing = dict(NUM_CHOICES=num_choices, TOP_K=top_k, MIN_K=min_k, SCORING=scoring, RENORMALIZE=renormalize,
                   DYNAMIC_K=top_p < 1.0)
    inter = torch.empty(num_slots, width, dtype=x.dtype, device=device)
    if decode:
        lcfg, ucfg, dcfg = cfg["router_logits"], cfg["decode_up"], cfg["decode_down"]
        logits = torch.empty(num_tokens, num_choices, dtype=torch.float32, device=device)
        launch(router_logits_kernel, (triton.cdiv(num_choices, lcfg["BLOCK_R"]),),
            router_input, w_router, b_router_, logits, num_tokens, router_input.shape[1], router_input.stride(0),
            w_router.stride(0), logits.stride(0), NUM_CHOICES=num_choices, HAS_BIAS=b_router is not None,
            BLOCK_R=lcfg["BLOCK_R"], BLOCK_H=lcfg["BLOCK_H"], num_warps=lcfg["num_warps"])
        # Column blocks follow the token bucket, not the exact count: one compiled variant per bucket.
        bucket = tuning.token_bucket(num_tokens)
        block_n = _decode_block_n(ucfg, bucket * top_k, width, multiprocessors)
        launch(decode_up_kernel, (num_slots, triton.cdiv(width, block_n)),
            x, w_in, b_in_, logits, inter, num_tokens, top_p, gate_scale, hidden, width, x.stride(0),
            w_in.stride(0), w_in.stride(1), stride_b_in, logits.stride(0), inter.stride(0), NUM_ROUTED=num_routed,
            **routing, ACTIVATION=activation, GATED=gated, HAS_BIAS=b_in is not None, BLOCK_E=block_e,
            BLOCK_K_CHOICES=block_k, BLOCK_N=block_n, BLOCK_K=ucfg["BLOCK_K"], **_launch_options(ucfg))
        block_n = _decode_block_n(dcfg, bucket, hidden, multiprocessors)
        launch(decode_down_kernel, (num_tokens, triton.cdiv(hidden, block_n)),
            inter, w_out, b_out_, logits, x, const_, out, num_tokens, top_p, gate_scale, hidden, width,
            inter.stride(0), w_out.stride(0), w_out.stride(1), stride_b_out, logits.stride(0), x.stride(0), stride_c,
            out.stride(0), NUM_ROUTED=num_routed, NUM_ZERO=num_zero, NUM_COPY=num_copy, **routing,
            HAS_BIAS=b_out is not None, BLOCK_E=block_e, BLOCK_K_CHOICES=block_k, BLOCK_N=block_n,
            BLOCK_K=dcfg["BLOCK_K"], **_launch_options(dcfg))
        return out, launches

    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    gates = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    rcfg = cfg["router"]
    num_blocks = triton.cdiv(num_tokens, rcfg["BLOCK_T"])
    rank = torch.empty(num_slots, dtype=torch.int32, device=device)
    block_counts = torch.empty(num_blocks * block_e, dtype=torch.int32, device=device)
    launch(router_kernel, (num_blocks,),
        router_input, w_router, b_router_, x, const_, out, ids, gates, rank, block_counts,
        num_tokens, router_input.shape[1], hidden, router_input.stride(0), w_router.stride(0), x.stride(0), stride_c,
        out.stride(0), top_p, gate_scale, **zero_computation, **routing, HAS_BIAS=b_router is not None,
        FP32_DOT=not (router_input.dtype == w_router.dtype and router_input.dtype in (torch.float16, torch.bfloat16)),
        INIT_OUT=atomic, BLOCK_T=rcfg["BLOCK_T"], BLOCK_H=rcfg["BLOCK_H"], BLOCK_E=block_e, BLOCK_K=block_k,
        BLOCK_X=rcfg["BLOCK_X"], num_warps=rcfg["num_warps"])

    sorted_slot = torch.empty(num_slots, dtype=torch.int32, device=device)
    expert_counts = torch.empty(block_e, dtype=torch.int32, device=device)
    expert_offsets = torch.empty(block_e, dtype=torch.int32, device=device)
    pcfg = cfg["permute"]
    launch(permute_kernel, (num_blocks,),
        ids, rank, block_counts, sorted_slot, expert_counts, expert_offsets, num_tokens, num_blocks,
        NUM_ROUTED=num_routed, TOP_K=top_k, BLOCK_T=rcfg["BLOCK_T"], BLOCK_E=block_e, BLOCK_K=block_k,
        BLOCK_B=pcfg["BLOCK_B"], num_warps=pcfg["num_warps"])

    ucfg, dcfg = cfg["up"], cfg["down"]
    up_grid = (_max_tiles(num_slots, num_routed, ucfg), triton.cdiv(width, ucfg["BLOCK_N"]))
    launch(grouped_up_kernel, up_grid,
        x, w_in, b_in_, inter, sorted_slot, expert_counts, expert_offsets, hidden, width, x.stride(0),
        w_in.stride(0), w_in.stride(1), stride_b_in, inter.stride(0), NUM_ROUTED=num_routed, TOP_K=top_k,
        ACTIVATION=activation, GATED=gated, HAS_BIAS=b_in is not None, FP32_DOT=fp32_dot, BLOCK_E=block_e,
        BLOCK_M=ucfg["BLOCK_M"], BLOCK_N=ucfg["BLOCK_N"], BLOCK_K=ucfg["BLOCK_K"], **_launch_options(ucfg))
    slot_out = out if atomic else torch.empty(num_slots, hidden, dtype=torch.float32, device=device)
    down_grid = (_max_tiles(num_slots, num_routed, dcfg), triton.cdiv(hidden, dcfg["BLOCK_N"]))
    launch(grouped_down_kernel, down_grid,
        inter, w_out, b_out_, gates, sorted_slot, expert_counts, expert_offsets, slot_out, hidden, width,
        inter.stride(0), w_out.stride(0), w_out.stride(1), stride_b_out, slot_out.stride(0), NUM_ROUTED=num_routed,
        TOP_K=top_k, HAS_BIAS=b_out is not None, FP32_DOT=fp32_dot, ATOMIC=atomic, BLOCK_E=block_e,
        BLOCK_M=dcfg["BLOCK_M"], BLOCK_N=dcfg["BLOCK_N"], BLOCK_K=dcfg["BLOCK_K"], **_launch_options(dcfg))
    if atomic:
        return out, launches
    ccfg = cfg["combine"]
    combine_grid = (triton.cdiv(num_tokens, ccfg["BLOCK_T"]), triton.cdiv(hidden, ccfg["BLOCK_X"]))
    launch(combine_kernel, combine_grid,
        slot_out, ids, gates, x, const_, out, num_tokens, hidden, slot_out.stride(0), x.stride(0), stride_c,
        out.stride(0), **zero_computation, NUM_CHOICES=num_choices, TOP_K=top_k, BLOCK_T=ccfg["BLOCK_T"],
        BLOCK_X=ccfg["BLOCK_X"], BLOCK_K=block_k, num_warps=ccfg["num_warps"])
    return out, launches


def _max_tiles(num_slots: int, num_routed: int, cfg: dict) -> int:
    """Upper bound on sum_e ceil(count_e / BLOCK_M), known without reading the counts."""
    return triton.cdiv(num_slots, cfg["BLOCK_M"]) + min(num_routed, num_slots)
