"""Safetensors checkpoints read and written one tensor at a time (the layer-by-layer conversion's I/O).

``SourceShards`` indexes a transformers checkpoint directory (``model.safetensors``, or shards with
or without ``model.safetensors.index.json``) from the files' headers and reads single tensors, or
single rows of an embedding, without mapping whole files. ``ShardWriter`` writes shards whose
tensors come from memory or are copied from a source in bounded chunks, and the index that
transformers' ``from_pretrained`` and ``moefx.load_pretrained`` read.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Union

import torch
from torch import Tensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# moefx-layout weights go under other names, so transformers cannot load them as the dense architecture
MOEFX_PREFIX = "moefx_model"
MOEFX_INDEX = f"{MOEFX_PREFIX}.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
CHUNK = 64 << 20  # bytes copied at a time


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    file: str
    dtype: torch.dtype
    shape: tuple
    start: int  # absolute byte offset in the file
    nbytes: int


class SourceShards:
    """The tensors of a checkpoint directory, by name, read on demand."""

    def __init__(self, path: str):
        self.path = path
        self.files = self._files()
        self.tensors: dict[str, StoredTensor] = {}
        for file in self.files:
            self.tensors.update(read_header(file))

    def fingerprint(self) -> dict[str, list]:
        """{file: [size, mtime in ns, SHA-256 of its header]}: what a resumed conversion checks the source against
        (a changed or re-saved shard differs in one of them)."""
        out = {}
        for file in self.files:
            stat = os.stat(file)
            with open(file, "rb") as f:
                head = f.read(8)
                head += f.read(struct.unpack("<Q", head)[0])
            out[os.path.basename(file)] = [stat.st_size, stat.st_mtime_ns, hashlib.sha256(head).hexdigest()]
        return out

    def _files(self) -> list[str]:
        index = next((os.path.join(self.path, i) for i in (INDEX, MOEFX_INDEX)
                      if os.path.exists(os.path.join(self.path, i))), None)
        if index is not None:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            missing = [n for n in names if not os.path.exists(os.path.join(self.path, n))]
            if missing:
                raise ValueError(f"moefx: {self.path} lists {len(missing)} shard(s) in {os.path.basename(index)} that "
                                 "are not there "
                                 f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); finish the "
                                 "download (e.g. huggingface-cli download) before converting")
            return [os.path.join(self.path, n) for n in names]
        files = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
        files = [f for f in files if not os.path.basename(f).startswith("moefx_")]
        if not files:
            other = sorted(os.path.basename(f) for pattern in ("*.bin", "*.pt", "*.pth", "*.gguf")
                           for f in glob.glob(os.path.join(self.path, pattern)))
            raise ValueError(f"moefx: {self.path} holds no safetensors weights" +
                             (f" (found {', '.join(other[:3])})" if other else "") +
                             "; moefx reads checkpoints tensor by tensor from safetensors: save the model with "
                             "model.save_pretrained(dir) (safetensors is the default) and convert that directory")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """One tensor, read from its file (optionally cast)."""
        stored = self.tensors[name]
        with open(stored.file, "rb") as f:
            f.seek(stored.start)
            data = bytearray(f.read(stored.nbytes))
        tensor = _from_bytes(data, stored.dtype).reshape(stored.shape)
        return tensor if dtype is None else tensor.to(dtype)

    def rows(self, name: str, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Rows ``ids`` of a 2-D tensor (an embedding table) without reading the rest of it."""
        stored = self.tensors[name]
        if len(stored.shape) != 2:
            raise ValueError(f"moefx: {name} has shape {stored.shape}; rows() reads 2-D tables")
        row_bytes = stored.nbytes // stored.shape[0]
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        data = bytearray(row_bytes * len(unique))
        with open(stored.file, "rb") as f:
            for i, row in enumerate(unique.tolist()):
                f.seek(stored.start + row * row_bytes)
                data[i * row_bytes:(i + 1) * row_bytes] = f.read(row_bytes)
        table = _from_bytes(data, stored.dtype).reshape(len(unique), stored.shape[1])
        table = table if dtype is None else table.to(dtype)
        return table[inverse].reshape(*ids.shape, stored.shape[1])


def read_header(file: str) -> dict[str, StoredTensor]:
    """{name: StoredTensor} from a safetensors file's header (the 8-byte length, then JSON), checked against
    the file's size: a truncated or malformed file is refused by name."""
    size = os.path.getsize(file)
    broken = f"moefx: {file} is truncated or not a safetensors file"
    again = "download or save it again"
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{broken} ({size} bytes); {again}")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError(f"{broken}: its header is {length:,} bytes long, the file {size:,}; {again}")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{broken} (unreadable header); {again}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{broken} (its header is no JSON object); {again}")
    base = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{broken} (the header entry of {name} lacks dtype, shape or data_offsets); {again}") \
                from None
        if dtype not in DTYPES:
            raise ValueError(f"moefx: {file} stores {name} as {dtype}, which moefx does not read; "
                             f"convert the checkpoint to one of {sorted(DTYPES)}")
        nbytes = math.prod(shape) * _itemsize(DTYPES[dtype])
        if not 0 <= begin <= end or end - begin != nbytes or base + end > size:
            raise ValueError(f"{broken}: {name} ({dtype} {list(shape)}, {nbytes:,} bytes) lies at bytes "
                             f"{base + begin:,}-{base + end:,} of a {size:,}-byte file; {again}")
        tensors[name] = StoredTensor(file, DTYPES[dtype], shape, base + begin, end - begin)
    return tensors


def _from_bytes(data: bytearray, dtype: torch.dtype) -> Tensor:
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype)


@dataclass(frozen=True)
class Copied:
    """A tensor copied from a source checkpoint into an output shard, cast to ``dtype`` chunk by chunk."""

    stored: StoredTensor
    dtype: torch.dtype

    @property
    def shape(self) -> tuple:
        return self.stored.shape

    @property
    def nbytes(self) -> int:
        return self.stored.nbytes // _itemsize(self.stored.dtype) * _itemsize(self.dtype)

    def write(self, out) -> None:
        step = CHUNK // _itemsize(self.stored.dtype) * _itemsize(self.stored.dtype)
        with open(self.stored.file, "rb") as f:
            f.seek(self.stored.start)
            left = self.stored.nbytes
            while left:
                data = bytearray(f.read(min(step, left)))
                left -= len(data)
                if self.dtype == self.stored.dtype:
                    out.write(data)
                else:
                    out.write(_to_bytes(_from_bytes(data, self.stored.dtype).to(self.dtype)))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _to_bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ShardWriter:
    """Writes ``<prefix>-00001-of-00004.safetensors``-style shards one at a time and the index naming them
    (``<prefix>.safetensors.index.json``; prefix "model" for transformers layouts, ``MOEFX_PREFIX`` for moefx's)."""

    def __init__(self, path: str, total: int, prefix: str = "model"):
        self.path, self.total, self.prefix = path, total, prefix
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def name(self, number: int) -> str:
        return f"{self.prefix}-{number:05d}-of-{self.total:05d}.safetensors"

    def write(self, number: int, tensors: dict[str, Union[Tensor, Copied]]) -> None:
        """Write shard ``number`` (1-based) holding ``tensors``, through a temporary name so that a shard
        on disk is always complete."""
        file = self.name(number)
        target = os.path.join(self.path, file)
        write_safetensors(target + ".partial", tensors)
        os.replace(target + ".partial", target)
        self.add(file, {k: _nbytes(v) for k, v in tensors.items()})

    def add(self, file: str, sizes: dict[str, int]) -> None:
        """Count a shard already on disk (a resumed run) in the index."""
        for key, size in sizes.items():
            self.weight_map[key] = file
            self.total_size += size

    def finish(self) -> None:
        with open(os.path.join(self.path, f"{self.prefix}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))},
                      f, indent=2)


def _nbytes(value: Union[Tensor, Copied]) -> int:
    return value.nbytes if isinstance(value, Copied) else value.numel() * value.element_size()


def write_safetensors(file: str, tensors: dict[str, Union[Tensor, Copied]]) -> None:
    """A safetensors file written tensor by tensor (``Copied`` entries are streamed from their source)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, value in tensors.items():
        dtype = value.dtype
        size = _nbytes(value)
        header[name] = {"dtype": NAMES[dtype], "shape": list(value.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(file, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for value in tensors.values():
            if isinstance(value, Copied):
                value.write(out)
            else:
                out.write(_to_bytes(value))


def read_shard(file: str) -> dict[str, Tensor]:
    """Every tensor of one safetensors file (a truncated or malformed one refused by name)."""
    from safetensors.torch import load_file

    read_header(file)
    return load_file(file)


def shard_files(path: str) -> Iterable[str]:
    """The weight files of a checkpoint directory written by moefx: the index's shards, else ``model.safetensors``."""
    index = next((os.path.join(path, i) for i in (MOEFX_INDEX, INDEX) if os.path.exists(os.path.join(path, i))), None)
    if index is not None:
        with open(index) as f:
            return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    return [os.path.join(path, SINGLE)]
