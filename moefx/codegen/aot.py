"""Compile the launches ``launch.plan`` makes for a GPU that is not here, and read their resource use.

Triton wheels carry the NVIDIA backend, ptxas and cuobjdump, so every kernel can be compiled for
sm90 on a CPU-only machine: this catches lowering errors and register spills before any GPU
time is spent. Arguments get the same specialisation the JIT gives them at run time (16-byte
aligned pointers, integers divisible by 16 unless marked ``do_not_specialize``).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moefx.codegen.launch import Launch

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32"}


def nvidia_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_launch(launch: Launch, arch: int = 90):
    """The CompiledKernel for ``launch`` on an sm_<arch> GPU."""
    kernel = launch.kernel
    values = dict(zip(kernel.arg_names, launch.args)) | launch.kwargs
    options = {k: values.pop(k) for k in ("num_warps", "num_stages") if k in values}
    not_specialized = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize or ()}
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = values[name]
        if index in kernel.constexprs:
            signature[name], constants[name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if abs(value) < 2 ** 31 else "i64"
        if isinstance(value, torch.Tensor) or (signature[name] != "fp32" and name not in not_specialized
                                               and value % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def resource_report(launch: Launch, arch: int = 90) -> dict:
    """Registers, spill stack, shared memory and the matrix instructions of ``launch``'s sm_<arch> SASS."""
    compiled = compile_launch(launch, arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([nvidia_tool("cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([nvidia_tool("cuobjdump"), "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    registers, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return {"kernel": launch.kernel.__name__, "grid": launch.grid, "registers": registers, "spill_stack": stack,
            "shared_bytes": compiled.metadata.shared, "local_loads": sass.count("LDL"),
            "matrix_instructions": sorted({m for m in ("HGMMA", "HMMA") if m in sass})}
