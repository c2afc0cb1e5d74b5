"""The slow tier: where offloaded experts' weights live, and how one expert is brought to the fast tier.

On CPU the experts stay in safetensors files, memory-mapped: an expert is a zero-copy view of the file
(its leading index of a [E, ...] tensor is contiguous), and loading it is one copy into fast memory, read
from the page cache or the disk. On a GPU they live in pinned CPU memory and load with an asynchronous
host-to-device copy on the prefetcher's own CUDA stream. ``bandwidth`` (bytes/s) throttles a load to at
most that rate, to emulate a slower link (PCIe, NVMe) than the page cache this machine reads from.
"""
from __future__ import annotations

import json
import mmap
import struct
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

EXPERT_TENSORS = ("w_in", "b_in", "w_out", "b_out")  # MoELayer's per-expert parameters, leading dim E
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


@dataclass
class Loaded:
    """One expert in the fast tier: (w_in, b_in, w_out, b_out) and, on CUDA, the event its copy records."""

    tensors: tuple
    nbytes: int
    event: Optional[object] = None


class SafetensorsFiles:
    """Tensors of safetensors files by name, as zero-copy CPU views of a private memory map."""

    def __init__(self, files: list[str]):
        self.maps: list[mmap.mmap] = []
        self.entries: dict[str, tuple[int, torch.dtype, tuple, int]] = {}
        for file in files:
            with open(file, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
                # ACCESS_COPY: writable for torch.frombuffer, never written, so pages come from the file
                self.maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
            for name, entry in header.items():
                if name != "__metadata__":
                    begin, _ = entry["data_offsets"]
                    self.entries[name] = (len(self.maps) - 1, DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                          8 + size + begin)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def view(self, name: str, index: Optional[int] = None) -> Tensor:
        """Tensor ``name`` (or its slice ``index`` along dim 0) over the map: no bytes are read yet."""
        which, dtype, shape, offset = self.entries[name]
        inner = shape[1:] if index is not None else shape
        count = 1
        for n in inner:
            count *= n
        if index is not None:
            offset += index * count * dtype.itemsize
        return torch.frombuffer(self.maps[which], dtype=dtype, count=count, offset=offset).view(inner)

    def close(self) -> None:
        for m in self.maps:
            try:
                m.close()
            except BufferError:  # a view is still alive; the map goes with it
                pass


class SlowTier:
    """Every offloaded expert's weights, by (layer name, expert): loads one into the fast tier on ``device``."""

    def __init__(self, files: SafetensorsFiles, device: torch.device, bandwidth: Optional[float] = None):
        self.files, self.device, self.bandwidth = files, torch.device(device), bandwidth
        self.pinned: dict[tuple[str, int], tuple] = {}
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def names(self, layer: str) -> tuple:
        """The per-expert tensor names of ``layer`` in the files (None where the layer has no such bias)."""
        return tuple(f"{layer}.{t}" if f"{layer}.{t}" in self.files else None for t in EXPERT_TENSORS)

    def source(self, layer: str, expert: int) -> tuple:
        """Expert ``expert`` of ``layer`` where it lies on the slow tier (pinned host memory for a GPU)."""
        if self.stream is None:
            return tuple(None if n is None else self.files.view(n, expert) for n in self.names(layer))
        key = (layer, expert)
        if key not in self.pinned:  # first use: the file's pages into pinned memory, once
            self.pinned[key] = tuple(None if n is None else self.files.view(n, expert).pin_memory()
                                     for n in self.names(layer))
        return self.pinned[key]

    def pin_all(self, layers: dict[str, int]) -> None:
        """Copy every expert into pinned host memory now (GPU only), so no load reads the disk."""
        if self.stream is not None:
            for layer, count in layers.items():
                for e in range(count):
                    self.source(layer, e)

    def load(self, layer: str, expert: int) -> Loaded:
        """Expert ``expert`` of ``layer`` copied into fresh fast-tier tensors."""
        start = time.perf_counter()
        source = self.source(layer, expert)
        nbytes = sum(t.nbytes for t in source if t is not None)
        if self.stream is None:
            tensors = tuple(None if t is None else torch.empty(t.shape, dtype=t.dtype).copy_(t) for t in source)
            event = None
        else:
            with torch.cuda.stream(self.stream):
                tensors = tuple(None if t is None else torch.empty(t.shape, dtype=t.dtype, device=self.device)
                                .copy_(t, non_blocking=True) for t in source)
                event = torch.cuda.Event()
                event.record(self.stream)
        if self.bandwidth:
            left = nbytes / self.bandwidth - (time.perf_counter() - start)
            if left > 0:
                time.sleep(left)
        return Loaded(tensors, nbytes, event)

    def close(self) -> None:
        self.pinned.clear()
        self.files.close()
