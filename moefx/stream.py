"""Convert a transformers checkpoint directory layer by layer, with memory bounded by one block.

The sequential pipeline of llm-compressor, GPTQ and AutoRound applied to ``moefx.convert``: the
model is built on the meta device; only the small modules outside its layer stack (norms, rotary
tables) are read from the shards, and the input embedding rows the calibration tokens use. One
forward of that shell, with every block replaced by a recorder, gives each block's call (the
hidden states entering block 0, and the masks and position embeddings the parent passes each
block). Then each block in turn is read from the shards, converted alone on the hidden states
the converted blocks before it produce (the layer-wise targets the fitting stages use), written
to its own output shard, and freed. Peak memory: one block in fp32 plus the carried calibration
activations, whatever the depth. A model without a layer stack is converted in memory.

The output directory is written as ``DST.moefx-partial`` and renamed when complete; a run
interrupted after some blocks resumes from the last block written.
"""
from __future__ import annotations

import dataclasses
import errno
import gc
import inspect
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moefx.convert import convert, rebuild
from moefx.convert.stages import ConversionReport, LayerOrigin
from moefx.recipe import Recipe, resolve
from moefx.runtime import call_model
from moefx.shards import MOEFX_PREFIX, Copied, ShardWriter, SourceShards, read_shard
from moefx.summary import Summary, summary

log = logging.getLogger("moefx")

PROGRESS = "moefx_progress.json"
PARTIAL = ".moefx-partial"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BATCH_TOKENS = 2048  # calibration tokens per batch (sequences of one batch share one forward)


@dataclass
class PretrainedConversion:
    """What ``convert_pretrained`` wrote: the conversion report, the MoE summary, how, and how long it took."""

    path: str
    report: ConversionReport
    summary: Summary
    streamed: bool
    blocks: int = 0
    resumed_from: int = 0
    calibration_tokens: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        how = (f"layer by layer ({self.blocks} blocks" + (f", resumed after block {self.resumed_from}"
                                                          if self.resumed_from else "") + ")"
               if self.streamed else "in memory")
        lines = [f"wrote {self.path}: converted {how} on {self.calibration_tokens:,} calibration tokens in "
                 f"{self.seconds:.1f} s", *self.notes, str(self.summary), str(self.report)]
        return "\n".join(lines)


def convert_pretrained(src: str, dst: str, recipe: Optional[Recipe] = None, *,
                       calibration: Union[str, Sequence[str], None] = None, calibration_tokens: int = 8192,
                       sequence_length: int = 512, dtype: Optional[str] = None, layout: str = "moefx",
                       progress: bool = True, **options: Any) -> PretrainedConversion:
    """Convert the transformers checkpoint in directory ``src`` and write the MoE model to ``dst``.

    Args:
        recipe: a ``moefx.Recipe``, or its fields as keyword ``options`` (``num_experts=8, top_k=2``).
        calibration: a text file (one sample per line), a JSONL file (``text`` or ``input_ids`` per
            record), or a list of strings; default: sentences of Python's documentation.
        calibration_tokens: tokens of calibration, cut into sequences of ``sequence_length``.
        dtype: "float32", "bfloat16" or "float16" for the written weights; default: the checkpoint's.
        layout: "moefx" (load with ``moefx.load_pretrained``), or "mixtral" / "qwen2_moe" (loads with
            ``transformers.AutoModelForCausalLM``), as ``moefx.save_pretrained``.

    Blocks are computed in float32 whatever the checkpoint's dtype.
    """
    from moefx.checkpoint import LAYOUTS, layout_refusal

    start = time.perf_counter()
    if layout not in LAYOUTS:
        raise ValueError(f"moefx.convert_pretrained: layout={layout!r} is not one of {LAYOUTS}")
    if recipe is None:
        recipe = resolve(options, layout)
    elif options:
        raise TypeError("moefx.convert_pretrained: pass either recipe= or the recipe's fields as keywords, not both")
    refusal = layout_refusal(recipe, layout)
    if refusal:
        raise ValueError(f"moefx: layout={layout!r} cannot hold this recipe's layers: {refusal}")
    source = Source(src)
    out_dtype = source.output_dtype(dtype)
    _check_destination(dst)
    ids = calibration_ids(source, calibration, calibration_tokens, sequence_length)
    partial = dst.rstrip("/") + PARTIAL
    settings = dict(source=os.path.abspath(src), recipe=recipe.to_dict(), dtype=str(out_dtype), layout=layout,
                    calibration=_fingerprint(ids), weights=source.shards.fingerprint())
    model = source.meta_model()
    stack = layer_stack(model)
    if stack is not None:
        _check_width(source.config, *stack, recipe)
    try:
        if stack is None:
            result = _convert_in_memory(source, partial, recipe, ids, out_dtype, layout, progress)
        else:
            result = Streamer(source, model, stack, recipe, ids, out_dtype, layout, partial, settings, progress).run()
    except OSError as error:
        _discard_if_nothing_written(partial)
        if error.errno != errno.ENOSPC:
            raise
        raise ValueError(f"moefx: the disk holding {partial} is full; free space (the output takes about the "
                         f"source's size at the same dtype) and run the same command again: it resumes after the "
                         "last block written") from error
    except BaseException:
        _discard_if_nothing_written(partial)
        raise
    if os.path.isdir(dst):
        os.rmdir(dst)  # empty: checked above
    os.replace(partial, dst)
    result.path, result.seconds = dst, time.perf_counter() - start
    result.calibration_tokens = sum(b.numel() for b in ids)
    return result


def _check_width(config, stack_name: str, stack: nn.ModuleList, recipe: Recipe) -> None:
    """The recipe against the FFN width the config states, before any block is read (block 0's conversion
    checks every FFN it finds); a width no linear layer of block 0 has is not taken for the FFN's."""
    key = next((k for k in ("intermediate_size", "ffn_dim", "n_inner", "d_ff") if getattr(config, k, None)), None)
    width = getattr(config, key) if key else None
    linear = [m for m in stack[0].modules() if isinstance(m, nn.Linear)]
    if width and any(width in (m.in_features, m.out_features) for m in linear):
        recipe.check_width(f"{stack_name}.0 ({key}={width})", width)


def _discard_if_nothing_written(partial: str) -> None:
    """A failed run that finished no block leaves nothing behind; one that did keeps its blocks to resume."""
    if os.path.isdir(partial) and not os.path.exists(os.path.join(partial, PROGRESS)):
        shutil.rmtree(partial)


class Source:
    """A transformers model directory: its config, tokenizer, shards and the class that holds its head."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise ValueError(f"moefx: {path} is not a directory; pass a transformers model directory (config.json "
                             "and *.safetensors, as model.save_pretrained(dir) writes)")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"moefx: {path} has no config.json, so it is not a transformers model directory; pass "
                             "the directory model.save_pretrained(dir) or huggingface-cli download wrote")
        import transformers

        self.path = path
        self.config = transformers.AutoConfig.from_pretrained(path)
        if getattr(self.config, "is_encoder_decoder", False):
            raise ValueError(f"moefx: {path} holds an encoder-decoder model ({self.config.model_type}), which moefx "
                             "converts only in memory: load it, moefx.convert(model, calibration=[{'input_ids': ..., "
                             "'decoder_input_ids': ...}], ...), then moefx.save_pretrained(moe, dst)")
        self.shards = SourceShards(path)
        self.architecture = (getattr(self.config, "architectures", None) or [None])[0]
        self._tokenizer = None

    @property
    def causal_lm(self) -> bool:
        """Whether the config's architecture is a class ``AutoModelForCausalLM`` builds (``LlamaForCausalLM``, and
        ``GPT2LMHeadModel`` whose name says otherwise)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ([v] if isinstance(v, str) else v)}
        return self.architecture in names

    def model_class(self):
        """``AutoModelForCausalLM`` when the config's architecture is a causal LM (it keeps its head), else
        ``AutoModel``."""
        import transformers

        return transformers.AutoModelForCausalLM if self.causal_lm else transformers.AutoModel

    def meta_model(self) -> nn.Module:
        """The model with every tensor on the meta device (no memory), computing in float32."""
        with torch.device("meta"):
            model = self.model_class().from_config(self.config, dtype=torch.float32)
        return model.eval()

    def output_dtype(self, name: Optional[str]) -> torch.dtype:
        if name is None:
            stored = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
            stored = getattr(torch, stored) if isinstance(stored, str) else stored
            return stored if stored in DTYPES.values() else torch.float32
        if name not in DTYPES:
            raise ValueError(f"moefx: dtype={name!r} is not one of {tuple(DTYPES)}")
        return DTYPES[name]

    def tokenizer(self):
        if self._tokenizer is None:
            import transformers

            try:
                self._tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
            except Exception as error:
                raise ValueError(f"moefx: {self.path} has no tokenizer moefx can load ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''}); copy the model's tokenizer "
                                 "files (tokenizer.json, tokenizer_config.json) into it, or calibrate on token ids: a "
                                 "JSONL file of {\"input_ids\": [...]} records") from None
        return self._tokenizer

    def key_map(self, model: nn.Module) -> dict[str, str]:
        """{model state-dict key: checkpoint key}; keys tied to another (a tied LM head) are left out."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        tied = _aliases(model)
        renamed = _renamed(model, self.shards.tensors)
        mapping, missing = {}, []
        for key in model.state_dict(keep_vars=True):
            candidates = [key] + ([key[len(prefix) + 1:]] if prefix and key.startswith(prefix + ".") else []) + (
                [f"{prefix}.{key}"] if prefix else [])
            found = next((renamed[c] for c in candidates if c in renamed), None)
            if found is not None:
                mapping[key] = found
            elif key not in tied and not _non_persistent(model, key):
                missing.append(key)
        if missing:
            raise ValueError(f"moefx: the checkpoint in {self.path} lacks {len(missing)} tensor(s) of "
                             f"{type(model).__name__} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                             "check that config.json belongs to these weights, or that every shard is there")
        return mapping


def _renamed(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """{checkpoint key as transformers renames it on loading: checkpoint key} (GPT-NeoX stores its head as
    ``embed_out``, the model names it ``lm_head``)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    return {apply_renamings(key, renamings): key for key in sorted(keys)}


def _aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are a second name of another parameter (tied weights)."""
    seen, aliases = {}, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        else:
            seen[id(param)] = name
    return aliases


def _non_persistent(model: nn.Module, key: str) -> bool:
    owner, _, name = key.rpartition(".")
    return name in model.get_submodule(owner)._non_persistent_buffers_set


def _check_destination(dst: str) -> None:
    if os.path.isfile(dst) or (os.path.isdir(dst) and os.listdir(dst)):
        raise ValueError(f"moefx: {dst} exists and is not empty; pass a new directory (moefx does not overwrite "
                         "a checkpoint) or remove it first")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise ValueError(f"moefx: the directory {parent} that would hold {dst} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"moefx: cannot write into {parent}, which would hold {dst} (and {os.path.basename(dst)}"
                         f"{PARTIAL} while converting); pass a DST in a directory you can write to")


def layer_stack(model: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    """The model's stack of blocks: the ``nn.ModuleList`` of same-type modules holding most parameters
    (``model.layers`` of a decoder LM, ``encoder.layer`` of BERT); None when there is none."""
    total = sum(p.numel() for p in model.parameters())
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None or best[0] < total / 4:
        return None
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------- calibration

def read_calibration(file: str) -> list:
    """Samples of a calibration file: strings (a text file, one per line, or JSONL ``text``) or token-id
    lists (JSONL ``input_ids``)."""
    if not os.path.isfile(file):
        raise ValueError(f"moefx: calibration file {file} does not exist")
    jsonl = file.endswith((".jsonl", ".json"))
    samples = []
    with open(file, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"moefx: {file} line {number} is not UTF-8 text ({error.reason} at byte "
                                 f"{error.start}); save the file as UTF-8 (e.g. iconv -t UTF-8)") from None
            if line.strip():
                samples.append(_record(file, number, line) if jsonl else line.rstrip("\r\n"))
    if not samples:
        raise ValueError(f"moefx: calibration file {file} holds no samples")
    return samples


def _record(file: str, number: int, line: str) -> Union[str, list[int]]:
    """The sample of JSONL line ``number``: its ``text`` string or its ``input_ids`` list of token ids."""
    where = f"moefx: {file} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not JSON ({error}); a JSONL calibration file holds one {{\"text\": ...}} "
                         "record per line") from None
    if not isinstance(record, dict) or ("text" not in record and "input_ids" not in record):
        raise ValueError(f"{where} has no 'text' (or 'input_ids') field; each JSONL record must hold one")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError(f"{where}: 'text' is a {type(record['text']).__name__}, not a string; write the "
                             "sample as {\"text\": \"...\"}")
        return record["text"]
    ids = record["input_ids"]
    if not isinstance(ids, list) or not ids or not all(type(t) is int and t >= 0 for t in ids):
        raise ValueError(f"{where}: 'input_ids' is not a non-empty list of token ids (integers >= 0); write the "
                         "sample as {\"input_ids\": [101, 2023, ...]}")
    return ids


def calibration_ids(source: Source, calibration: Union[str, Sequence, None], tokens: int,
                    sequence_length: int, fewer: bool = False) -> list[Tensor]:
    """``tokens`` calibration tokens as batches of [sequences, sequence_length] token ids: the samples are
    tokenised, joined (separated by the EOS token) and cut into sequences, each opening with BOS when the
    tokenizer adds one (no padding anywhere). Samples giving fewer tokens are refused, or with ``fewer`` all
    taken (held-out data for ``moefx eval``)."""
    if tokens < 1 or sequence_length < 1:
        raise ValueError(f"moefx: calibration_tokens={tokens} and sequence_length={sequence_length} must be >= 1")
    limit = getattr(source.config, "max_position_embeddings", None)
    sequence_length = min(sequence_length, tokens, limit or sequence_length)
    if isinstance(calibration, str):
        samples, origin = read_calibration(calibration), calibration
    elif calibration is None:
        from moefx.data import python_doc_sentences

        samples, origin = python_doc_sentences(1750), "the default corpus (Python's documentation, 1750 sentences)"
    else:
        samples, origin = list(calibration), "the calibration samples"
    texts = any(isinstance(s, str) for s in samples)
    tokenizer = source.tokenizer() if texts else None
    bos = eos = None
    if tokenizer is not None:
        probe = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None and probe[:1] == [
            tokenizer.bos_token_id] else None
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    body = sequence_length - (bos is not None)
    needed = tokens // sequence_length * body + max(tokens % sequence_length - (bos is not None), 0)
    stream: list[int] = []
    for sample in samples:
        if isinstance(sample, str):
            stream += tokenizer(sample, add_special_tokens=False).input_ids
        else:
            stream += [int(t) for t in sample]
        if eos is not None:
            stream.append(eos)
        if len(stream) >= needed:
            break
    if len(stream) < needed and fewer:
        needed = len(stream)
    if len(stream) < needed:
        raise ValueError(f"moefx: {origin} gives {len(stream):,} tokens; {tokens:,} calibration tokens were asked "
                         "for: add samples, or lower calibration_tokens (--calibration-tokens)")
    vocab = getattr(source.config, "vocab_size", None)
    if vocab and max(stream[:needed]) >= vocab:
        raise ValueError(f"moefx: calibration token id {max(stream[:needed])} is outside the model's vocabulary "
                         f"({vocab}); the token ids or the tokenizer do not belong to this model")
    stream = stream[:needed]
    sequences = [([bos] if bos is not None else []) + stream[i:i + body] for i in range(0, len(stream), body)]
    per_batch = max(1, BATCH_TOKENS // sequence_length)
    batches = []
    full = [s for s in sequences if len(s) == sequence_length]
    for i in range(0, len(full), per_batch):
        batches.append(torch.tensor(full[i:i + per_batch]))
    batches += [torch.tensor([s]) for s in sequences if len(s) != sequence_length and len(s)]
    return batches


def _fingerprint(ids: list[Tensor]) -> list:
    return [list(b.shape) for b in ids] + [int(sum(int(b.sum()) for b in ids))]


# ---------------------------------------------------------------------------------------------- streaming

class _Stop(Exception):
    """Ends the shell's forward after the last block has been recorded."""


class _Recorder(nn.Module):
    """Stands in for block ``index`` during the shell's forward: records the call, passes the hidden state on."""

    def __init__(self, index: int, calls: list, last: bool, wrap: Callable[[Tensor], Any]):
        super().__init__()
        self.index, self.calls, self.last, self.wrap = index, calls, last, wrap

    def forward(self, *args, **kwargs):
        self.calls.append((self.index, args, kwargs))
        if self.last:
            raise _Stop
        return self.wrap(args[0] if args else next(iter(kwargs.values())))


class Streamer:
    """One layer-by-layer conversion (see the module docstring)."""

    def __init__(self, source: Source, model: nn.Module, stack: tuple[str, nn.ModuleList], recipe: Recipe,
                 ids: list[Tensor], out_dtype: torch.dtype, layout: str, partial: str, settings: dict,
                 progress: bool):
        self.source, self.model, self.recipe, self.ids = source, model, recipe, ids
        self.stack_name, self.stack = stack
        self.blocks = list(self.stack)
        self.out_dtype, self.layout, self.partial, self.settings = out_dtype, layout, partial, settings
        self.progress = progress
        self.keys = source.key_map(model)
        self.report = ConversionReport()
        self.rows = []
        self.notes: list[str] = []
        self.writer = ShardWriter(partial, len(self.blocks) + 1, MOEFX_PREFIX if layout == "moefx" else "model")
        self.target = None  # the transformers MoE model (on meta) for layout="mixtral" / "qwen2_moe"
        self.wrap: Callable[[Tensor], Any] = lambda h: h  # a hidden state in the blocks' output structure

    # -- the shell: everything outside the stack except the embedding tables and the head

    def load_shell(self) -> None:
        skip = self._big_tables()
        inside = lambda name: name == self.stack_name or name.startswith(self.stack_name + ".")  # noqa: E731
        for name, module in self.model.named_modules():
            if inside(name):
                continue
            if any(name == s or name.startswith(s + ".") for s in skip):
                self._initialise_buffers(module, name)  # the table stays on disk, its scale (Gemma's) does not
                continue
            self._materialise(module, name, recurse=False)

    def _big_tables(self) -> set[str]:
        names = {m: n for n, m in self.model.named_modules()}
        tables = set()
        for get in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(self.model, get, lambda: None)()
            if isinstance(module, (nn.Embedding, nn.Linear)) and module in names:
                tables.add(names[module])
        return tables

    def _materialise(self, module: nn.Module, prefix: str, recurse: bool = True) -> None:
        """Give ``module``'s meta tensors their values: from the checkpoint, or the model's own initialisation
        for non-persistent buffers (rotary frequency tables, position ids)."""
        dot = prefix + "." if prefix else ""
        state = {}
        for name, tensor in module.state_dict(keep_vars=True).items() if recurse else _direct(module):
            key = self.keys.get(dot + name)
            if key is not None and tensor.is_meta:
                state[name] = self.source.shards.read(key, torch.float32 if tensor.is_floating_point() else None)
        module.load_state_dict(state, strict=False, assign=True)
        for sub_name, sub in (module.named_modules() if recurse else [("", module)]):
            self._initialise_buffers(sub, dot + sub_name)
        tied = _aliases(self.model)
        left = [n for n, t in (module.state_dict(keep_vars=True).items() if recurse else _direct(module))
                if t.is_meta and dot + n not in tied]
        if left:
            raise ValueError(f"moefx: {dot + left[0]} has no value in the checkpoint; check that config.json belongs "
                             "to these weights")

    def _initialise_buffers(self, module: nn.Module, name: str) -> None:
        """``module``'s own buffers still on the meta device, computed by the model's initialisation (its
        parameters keep their values)."""
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            return
        for n in meta:
            module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
        kept = {n: p.detach().clone() for n, p in module._parameters.items() if p is not None and not p.is_meta}
        init = getattr(self.model, "_init_weights", None)
        if init is None:
            raise ValueError(f"moefx: {name} keeps buffers {meta} outside the checkpoint and "
                             f"{type(self.model).__name__} has no _init_weights to compute them; convert in "
                             "memory: moefx.convert(model, ...)")
        with torch.no_grad():
            init(module)
            for n, value in kept.items():
                module._parameters[n].copy_(value)

    def embed(self, batch: Tensor) -> Tensor:
        """The input embedding of ``batch``, computed by the model's own embedding module (which may scale it)
        on just the rows the batch uses, read from the checkpoint (the rest of the table stays on disk)."""
        table = self.model.get_input_embeddings()
        names = {m: n for n, m in self.model.named_modules()}
        unique, inverse = torch.unique(batch, return_inverse=True)
        rows = self.source.shards.rows(self.keys[names[table] + ".weight"], unique, torch.float32)
        whole, padding = table.weight, table.padding_idx
        table.weight = nn.Parameter(rows, requires_grad=False)
        table.padding_idx = None  # an index into the whole table (it only masks gradients)
        try:
            with torch.no_grad():
                return table(inverse)
        finally:
            table.weight, table.padding_idx = whole, padding

    def record_calls(self) -> tuple[str, list[Tensor], list[list[dict]]]:
        """The blocks' calls in the parent's forward on each calibration batch: the name of the hidden-state
        argument, block 0's hidden state per batch, and per batch and block the other arguments."""
        first = self.blocks[0]
        self._materialise(first, f"{self.stack_name}.0")
        hidden_key = next(iter(inspect.signature(first.forward).parameters))
        probe: list = []
        self.stack[0] = _Recorder(0, probe, last=True, wrap=lambda h: h)
        self._run_shell(self.ids[0][:1])
        with torch.no_grad():
            output = call_model(first, _as_kwargs(first, *probe[0][1:]))
        wrap = (lambda h: h) if isinstance(output, Tensor) else (lambda h, rest=tuple(output[1:]): (h, *rest))
        self.wrap = wrap
        hidden, calls = [], []
        for batch in self.ids:
            recorded: list = []
            for i in range(len(self.blocks)):
                self.stack[i] = _Recorder(i, recorded, last=i == len(self.blocks) - 1, wrap=wrap)
            self._run_shell(batch)
            arguments = [_as_kwargs(first, args, kwargs) for _, args, kwargs in recorded]
            hidden.append(arguments[0][hidden_key])
            calls.append([{k: v for k, v in a.items() if k != hidden_key} for a in arguments])
        return hidden_key, hidden, calls

    def _run_shell(self, batch: Tensor) -> None:
        inputs = dict(inputs_embeds=self.embed(batch), attention_mask=torch.ones_like(batch))
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            inputs["use_cache"] = False
        try:
            with torch.no_grad():
                self.model(**inputs)
        except _Stop:
            return
        raise ValueError(f"moefx: {type(self.model).__name__}'s forward did not call every block of "
                         f"{self.stack_name}; convert in memory: moefx.convert(model, ...)")

    # -- the blocks

    def run(self) -> PretrainedConversion:
        done = self._resume()
        os.makedirs(self.partial, exist_ok=True)
        self.load_shell()
        hidden_key, hidden, calls = self.record_calls()
        with tqdm(total=len(self.blocks), desc="moefx convert", unit="block", disable=not self.progress) as bar:
            for i in range(len(self.blocks)):
                name, block = f"{self.stack_name}.{i}", self.blocks[i]
                bar.set_postfix_str(name)
                self._materialise(block, name)
                batches = [{hidden_key: h, **c[i]} for h, c in zip(hidden, calls)]
                converted = self._reload(block, batches[0], i) if i < done else self._convert_block(block, batches, i)
                with torch.no_grad():  # an autograd graph would keep every block alive through the activations
                    hidden = [_hidden(call_model(converted, b)) for b in batches]
                self.stack[i] = self.blocks[i] = None
                del block, converted, batches
                gc.collect()
                bar.update(1)
        self._finish()
        return PretrainedConversion(self.partial, self.report, Summary(self.rows), streamed=True,
                                    blocks=len(self.blocks), resumed_from=done, notes=self.notes)

    def _convert_block(self, block: nn.Module, batches: list[dict], i: int) -> nn.Module:
        name = f"{self.stack_name}.{i}"
        try:
            converted = convert(block, calibration=batches, recipe=self._block_recipe(), inplace=True, progress=False)
        except ValueError as error:
            raise ValueError(f"moefx: converting {name}: {error}") from error
        converted.to(self.out_dtype).float()  # compute the next inputs with the weights as written
        self._account(converted, name)
        self.writer.write(i + 1, self._block_tensors(converted, name, batches[0]))
        self._save_progress(i + 1)
        return converted

    def _block_recipe(self) -> Recipe:
        """The recipe for the next block: ``convert`` seeds upcycled routers by the FFN's index in the model,
        so an upcycled block continues that count (the result equals converting the whole model at once)."""
        if not self.recipe.upcycle:
            return self.recipe
        return dataclasses.replace(self.recipe, seed=self.recipe.seed + len(self.report.converted))

    def _reload(self, block: nn.Module, example: dict, i: int) -> nn.Module:
        """A block written by an earlier, interrupted run: its structure rebuilt, its values read back."""
        name = f"{self.stack_name}.{i}"
        converted = rebuild(block, example, self.recipe, inplace=True)
        file = self.writer.name(i + 1)
        state = read_shard(os.path.join(self.partial, file))
        self.writer.add(file, {k: v.numel() * v.element_size() for k, v in state.items()})
        converted.load_state_dict({k[len(name) + 1:]: v.float() for k, v in state.items()}, strict=True)
        self._account(converted, name)
        return converted

    def _account(self, converted: nn.Module, name: str) -> None:
        block_report = converted.moefx_report
        self.report.converted += [" -> ".join(f"{name}.{part}" for part in c.split(" -> "))
                                  for c in block_report.converted]
        self.report.skipped += [f"{name}.{s}" for s in block_report.skipped]
        self.report.layers += [LayerOrigin(f"{name}.{o.moe}", [f"{name}.{d}" for d in o.dense_inputs],
                                           f"{name}.{o.dense_output}") for o in block_report.layers]
        self.rows += [dataclasses.replace(row, name=f"{name}.{row.name}") for row in summary(converted).layers]

    def _block_tensors(self, converted: nn.Module, name: str, example: dict) -> dict[str, Tensor]:
        if self.layout == "moefx":
            return {f"{name}.{k}": v.detach().to(self.out_dtype).contiguous()
                    for k, v in converted.state_dict().items()}
        return self._target_block(converted, name, example)

    # -- the transformers MoE layouts, block by block

    def _target_block(self, converted: nn.Module, name: str, example: dict) -> dict[str, Tensor]:
        """The block's tensors under the names and layout of the transformers MoE class, checked by running
        that class's block on the calibration batch against the converted block."""
        from moefx.checkpoint import _TARGETS, _block_tensors, _moe_shape, _target_config
        import transformers

        config_name, class_name, sources = _TARGETS[self.layout]
        if type(self.model).__name__ not in sources:
            raise ValueError(f"moefx: layout={self.layout!r} writes a {class_name}, whose attention matches "
                             f"{' / '.join(sources)}; this model is a {type(self.model).__name__}: use layout='moefx'")
        layers = [m for m in converted.modules() if type(m).__name__ == "MoELayer"]
        shape = _moe_shape(layers, self.layout, class_name, type(self.model).__name__, self.recipe)
        if self.target is None:
            config = _target_config(self.source.config, getattr(transformers, config_name), self.layout, shape,
                                    class_name, type(self.model).__name__)
            with torch.device("meta"):
                self.target = getattr(transformers, class_name)(config)
            self.target_shape = shape
        elif shape != self.target_shape:
            raise ValueError(f"moefx: {name} converted to {shape}, the first block to {self.target_shape}; "
                             f"{class_name} has one shape for all layers: use layout='moefx'")
        index = int(name.rsplit(".", 1)[1])
        target_block = self.target.model.layers[index]
        wanted = {k: v for k, v in target_block.state_dict(keep_vars=True).items()}
        moe_name = next(n for n, m in target_block.named_modules() if type(m).__name__.endswith("SparseMoeBlock"))
        tensors = _block_tensors(layers[0], moe_name + ".", {k for k in wanted if k.startswith(moe_name + ".")},
                                 self.layout)
        own = {k: v for k, v in converted.state_dict().items() if ".moe." not in f".{k}"}
        tensors.update({k: v for k, v in own.items() if k in wanted and k not in tensors})
        unknown = sorted(set(wanted) - set(tensors)) + sorted(set(tensors) - set(wanted))
        if unknown:
            raise ValueError(f"moefx: {name}.{unknown[0]} is where moefx and {class_name} disagree on the layout; "
                             "use layout='moefx'")
        local = {k: v.detach().float().contiguous() for k, v in tensors.items()}
        target_block.load_state_dict(local, strict=True, assign=True)
        with torch.no_grad():
            want = _hidden(call_model(converted, example))
            got = _hidden(call_model(target_block, example))
        error = float((got - want).norm() / want.norm())
        self.target.model.layers[index] = nn.Identity()  # free the check's copy
        if not error <= 1e-4:
            raise ValueError(f"moefx: {class_name}'s block {index} built from {name} computes its output with "
                             f"relative error {error:.2e}; use layout='moefx'")
        return {f"model.layers.{index}.{k}": v.detach().to(self.out_dtype).contiguous() for k, v in tensors.items()}

    # -- progress, the last shard, the metadata

    def _resume(self) -> int:
        file = os.path.join(self.partial, PROGRESS)
        if not os.path.exists(file):
            _discard_if_nothing_written(self.partial)  # a run killed inside its first block
            return 0
        with open(file) as f:
            state = json.load(f)
        old, new = state["settings"].get("weights", {}), self.settings["weights"]
        changed = [f for f in sorted(set(old) | set(new)) if old.get(f) != new.get(f)]
        if changed:
            raise ValueError(f"moefx: the weights in {self.source.path} changed since the interrupted conversion in "
                             f"{self.partial} began ({changed[0]} differs in size, modification time or header); "
                             "its blocks belong to the old weights: remove it and convert again")
        if state.get("settings") != self.settings:
            raise ValueError(f"moefx: {self.partial} holds an interrupted conversion with other settings (source, "
                             "recipe, dtype, layout or calibration); remove it to start afresh, or rerun the same "
                             "command to resume it")
        if self.layout != "moefx" and state["blocks"]:
            raise ValueError(f"moefx: resuming a layout={self.layout!r} conversion is not supported; remove "
                             f"{self.partial} and convert again")
        self.notes.append(f"resumed the interrupted run in {self.partial} after {state['blocks']} block(s)")
        return int(state["blocks"])

    def _save_progress(self, blocks: int) -> None:
        file = os.path.join(self.partial, PROGRESS)
        with open(file + ".partial", "w") as f:
            json.dump(dict(settings=self.settings, blocks=blocks), f)
        os.replace(file + ".partial", file)

    def _finish(self) -> None:
        """The tensors outside the stack (copied as they are stored, cast to the output dtype), the index,
        config, tokenizer and, for layout="moefx", the recipe with a calibration row."""
        from moefx.checkpoint import EXAMPLE, RECIPE, record_written
        from safetensors.torch import save_file

        inside = self.stack_name + "."
        rest = {key: Copied(self.source.shards.tensors[ckpt], self.out_dtype
                            if self.source.shards.tensors[ckpt].dtype.is_floating_point
                            else self.source.shards.tensors[ckpt].dtype)
                for key, ckpt in self.keys.items() if not key.startswith(inside)}
        self.writer.write(len(self.blocks) + 1, rest)
        self.writer.finish()
        config = self.target.config if self.target is not None else self.source.config
        config = type(config).from_dict(config.to_dict())
        config.dtype = self.out_dtype
        config.architectures = [type(self.target if self.target is not None else self.model).__name__]
        config.save_pretrained(self.partial)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(self.source.path, extra)):
                shutil.copy(os.path.join(self.source.path, extra), self.partial)
        if self.layout == "moefx":
            example = {"input_ids": self.ids[0][:1, :64].clone()}
            save_file(example, os.path.join(self.partial, EXAMPLE))
            meta = dict(recipe=self.recipe.to_dict(), example_kind="dict", example_constants={},
                        model_class=type(self.model).__name__)
            with open(os.path.join(self.partial, RECIPE), "w") as f:
                json.dump(meta, f, indent=2)
        os.remove(os.path.join(self.partial, PROGRESS))
        record_written(self.partial, os.listdir(self.partial))
        if self.source._tokenizer is not None:  # not recorded: a later moefx save keeps it
            self.source._tokenizer.save_pretrained(self.partial)


def _direct(module: nn.Module) -> Iterable[tuple[str, Tensor]]:
    """A module's own parameters and persistent buffers (not its children's)."""
    yield from ((n, p) for n, p in module._parameters.items() if p is not None)
    yield from ((n, b) for n, b in module._buffers.items()
                if b is not None and n not in module._non_persistent_buffers_set)


def _as_kwargs(block: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A block call as one dict of keyword arguments (a calibration batch ``moefx.convert`` accepts)."""
    signature = inspect.signature(block.forward)
    bound = signature.bind_partial(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ValueError(f"moefx: {type(block).__name__} takes *{name}; moefx cannot name those arguments")
        else:
            out[name] = value
    return out


def _hidden(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


# ---------------------------------------------------------------------------------------------- in memory

def _convert_in_memory(source: Source, partial: str, recipe: Recipe, ids: list[Tensor], out_dtype: torch.dtype,
                       layout: str, progress: bool) -> PretrainedConversion:
    """A model without a layer stack: loaded whole, converted, saved (as ``moefx.save_pretrained``)."""
    from moefx.checkpoint import save_pretrained

    if os.path.isdir(partial):
        shutil.rmtree(partial)
    model = source.model_class().from_pretrained(source.path, dtype=torch.float32).eval()
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids]
    moe = convert(model, calibration=batches, recipe=recipe, inplace=True, progress=progress)
    moe.to(out_dtype)
    save_pretrained(moe, partial, layout=layout)
    if source._tokenizer is not None:
        source._tokenizer.save_pretrained(partial)
    return PretrainedConversion(partial, moe.moefx_report, summary(moe), streamed=False,
                                notes=[f"{type(model).__name__} has no stack of blocks (an nn.ModuleList holding most "
                                       "of its parameters): converted in memory, the whole model loaded at once"])
