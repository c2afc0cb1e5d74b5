"""Tuning tables for the moefx kernels: data, keyed by device and shape, rows by token bucket.

A table maps each stage to rows ``(max_tokens, config)``; the first row whose bound covers the
token bucket wins. Token counts are bucketed to powers of two (``token_bucket``), so the choice
of config, and with it the compiled kernels, is fixed within a bucket: no JIT recompilation per
token count. ``decode_max_tokens`` (a bucket boundary) is where the per-slot GEMV path hands
over to the grouped GEMMs. An entry keyed ``(device, H, F, E, top_k)`` overrides the device's default stage by stage.
"""
from __future__ import annotations

import functools
import os

import torch

TOKEN_BUCKETS = tuple(2 ** i for i in range(15))  # 1 .. 16384; larger counts share the last bucket

_ANY = None  # a row bound that covers every bucket

HOPPER = {
    "decode_max_tokens": 4,
    "router": [(64, dict(BLOCK_T=16, BLOCK_H=64, BLOCK_X=256, num_warps=4)),
               (_ANY, dict(BLOCK_T=64, BLOCK_H=64, BLOCK_X=128, num_warps=8))],
    "permute": [(_ANY, dict(BLOCK_B=32, num_warps=4))],
    "router_logits": [(_ANY, dict(BLOCK_R=4, BLOCK_H=512, num_warps=4))],
    # Decode GEMVs: the column block shrinks until every SM has `programs_per_sm` programs.
    # (4, 16) x 256 keeps the two fp32 accumulator tiles of the gated GEMV in registers (no spills on sm90).
    "decode_up": [(_ANY, dict(BLOCK_N=(4, 16), BLOCK_K=256, programs_per_sm=2, num_warps=4, num_stages=4))],
    "decode_down": [(_ANY, dict(BLOCK_N=(4, 16), BLOCK_K=256, programs_per_sm=2, num_warps=4, num_stages=4))],
    "up": [
        (64, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)),
        (1024, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)),
        (_ANY, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)),
    ],
    "down": [
        (64, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)),
        (1024, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)),
        (_ANY, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)),
    ],
    "combine": [(_ANY, dict(BLOCK_T=16, BLOCK_X=128, num_warps=4))],
}

# The CPU interpreter runs each program in Python: few, mid-sized tiles keep tests quick while
# still crossing tile edges on odd shapes.
INTERPRETER = {
    "decode_max_tokens": 2,
    "router": [(_ANY, dict(BLOCK_T=16, BLOCK_H=32, BLOCK_X=32, num_warps=1))],
    "permute": [(_ANY, dict(BLOCK_B=4, num_warps=1))],
    "router_logits": [(_ANY, dict(BLOCK_R=4, BLOCK_H=32, num_warps=1))],
    "decode_up": [(_ANY, dict(BLOCK_N=(16, 32), BLOCK_K=32, programs_per_sm=1, num_warps=1, num_stages=1))],
    "decode_down": [(_ANY, dict(BLOCK_N=(16, 32), BLOCK_K=32, programs_per_sm=1, num_warps=1, num_stages=1))],
    "up": [(_ANY, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1))],
    "down": [(_ANY, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1))],
    "combine": [(_ANY, dict(BLOCK_T=16, BLOCK_X=32, num_warps=1))],
}

TABLES = {
    "interpreter": INTERPRETER,
    "sm90": HOPPER,
    "cuda": HOPPER,  # other CUDA devices start from the Hopper table until tuned
}


def token_bucket(num_tokens: int) -> int:
    """The smallest bucket holding ``num_tokens`` (the last bucket for anything larger)."""
    for bucket in TOKEN_BUCKETS:
        if num_tokens <= bucket:
            return bucket
    return TOKEN_BUCKETS[-1]


def device_kind(device: torch.device) -> str:
    """'interpreter' under TRITON_INTERPRET=1, 'sm<major><minor>' when tuned for, else 'cuda'."""
    if os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda":
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    kind = f"sm{major}{minor}"
    return kind if kind in TABLES else "cuda"


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def stage_configs(kind: str, shape: tuple[int, int, int, int], num_tokens: int) -> dict:
    """Every stage's config (plus ``decode_max_tokens``) for ``shape`` = (H, F, E, top_k) at ``num_tokens``
    on a device of ``kind`` (see ``device_kind``)."""
    table = {**TABLES[kind], **TABLES.get((kind, *shape), {})}
    bucket = token_bucket(num_tokens)
    chosen = {"decode_max_tokens": table["decode_max_tokens"]}
    for stage, rows in table.items():
        if stage != "decode_max_tokens":
            chosen[stage] = next(dict(cfg) for bound, cfg in rows if bound is _ANY or bucket <= bound)
    return chosen
