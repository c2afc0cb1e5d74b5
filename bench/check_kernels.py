"""Numerics of the Triton kernels (``moe_triton``) against ``moe_reference`` at bench/bench_moe.py's shapes.

The same layers bench_moe.py times (softmax router, gated SwiGLU experts, uniform routing), in bf16 and
fp16 on a GPU; each row records the relative error ||out - ref|| / ||ref|| and the tolerance it is
judged by. Exits non-zero when a row fails. On a CPU under ``TRITON_INTERPRET=1`` (fp32, tiny shapes)
it checks that the script itself runs.

    python bench/check_kernels.py --json out/kernels.json
    TRITON_INTERPRET=1 python bench/check_kernels.py --device cpu --dtypes float32 --shape 64,48,8,2 --tokens 1,17
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_moe import SHAPES, chosen_shapes, make_layer  # noqa: E402
from moefx.codegen import moe_triton  # noqa: E402
from moefx.op import MoEAttrs, MoEInputs, moe_reference  # noqa: E402

TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}


def check(name: str, shape, tokens: int, dtype: str, device: torch.device) -> dict:
    layer = make_layer(shape, "uniform", device, getattr(torch, dtype))
    x = torch.randn(tokens, shape[0], generator=torch.Generator().manual_seed(tokens)).to(device, getattr(torch, dtype))
    inputs = MoEInputs(x, x, layer["w_router"], layer["b_router"], layer["w_in"], None, layer["w_out"], None, None)
    attrs = MoEAttrs(layer["top_k"], "silu", True, "softmax", layer["renormalize"])
    out, ref = moe_triton(inputs, attrs).float(), moe_reference(inputs, attrs).float()
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return {"shape": name, "H_F_E_k": list(shape[:4]), "tokens": tokens, "dtype": dtype, "rel_err": err,
            "tolerance": TOLERANCE[dtype], "ok": err <= TOLERANCE[dtype]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="mixtral,qwen3-30b-a3b,olmoe", help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--shape", help="a custom H,F,E,top_k instead of --shapes")
    parser.add_argument("--tokens", default="1,256,4096")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    shapes = chosen_shapes(parser, args)
    device = torch.device(args.device)
    rows = []
    for name, shape in shapes.items():
        for dtype in args.dtypes.split(","):
            for tokens in map(int, args.tokens.split(",")):
                rows.append(check(name, shape, tokens, dtype, device))
                r = rows[-1]
                print(f"{name:17} {dtype:9} {tokens:6d} rel err {r['rel_err']:.2e} (tolerance {r['tolerance']:.0e}) "
                      f"{'ok' if r['ok'] else 'FAIL'}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
