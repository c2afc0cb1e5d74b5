"""Calling a model on a batch, and hooks that are removed whatever happens.

A batch (calibration or evaluation) is a model input: a dict of keyword arguments (a
tokenizer's output), a tuple/list of positional arguments, or one tensor. Every part of moefx
that takes data reads it with ``read_batches``, runs a model through ``call_model``/``run_batch``
and registers hooks with ``hooks``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree


def read_batches(data: Iterable[Any], who: str, name: str, hint: str = "") -> list:
    """``data`` (argument ``name`` of ``who``) as a list of batches in new containers, mappings (a tokenizer's
    BatchEncoding) as dicts: a model that adds keys to its input dict, as SentenceTransformer does, must not
    change them for the next use. A bare batch and no batch are refused; ``hint`` says why data is needed."""
    if isinstance(data, Mapping):
        raise ValueError(f"{who}: {name} is one {type(data).__name__} (a single batch); iterating it would give its "
                         f"keys {list(data)[:4]}. Pass a list of batches: {name}=[batch]")
    if isinstance(data, Tensor):
        raise ValueError(f"{who}: {name} is one tensor of shape {tuple(data.shape)}; iterating it would call the "
                         f"model on each row alone. Pass a list of model inputs: {name}=[x]")
    batches = [_copy_batch(b) for b in data]
    if not batches:
        raise ValueError(f"{who}: {name} is empty; pass at least one model input (e.g. {name}=[tokenizer(texts, "
                         f"return_tensors='pt')]){hint}")
    return batches


def _copy_batch(batch: Any) -> Any:
    """New containers (dicts, lists, tuples) around the same tensors."""
    if isinstance(batch, Mapping):
        return {k: _copy_batch(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
        return type(batch)(_copy_batch(v) for v in batch)
    return batch


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple/list, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def run_batch(run: Callable[[Any], Any], batch: Any, index: int) -> Any:
    """``run(batch)`` without gradients, naming the batch if the model rejects it."""
    try:
        with torch.no_grad():
            return run(batch)
    except Exception as error:
        if isinstance(error, (TypeError, ValueError)) and str(error).startswith("moefx"):  # a call moefx refuses
            raise ValueError(f"moefx: calibration batch {index}: {error}") from error
        raise ValueError(f"moefx: the model rejected calibration batch {index} ({type(error).__name__}: {error}); "
                         "each batch must be a model input: a tensor, a tuple of positional arguments, or a dict "
                         "of keyword arguments") from error


def output_tensor(output: Any) -> Tensor:
    """The first floating-point tensor of a model output (transformers/diffusers outputs, tuples)."""
    for leaf in pytree.tree_leaves(output if not hasattr(output, "to_tuple") else output.to_tuple()):
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            return leaf
    raise ValueError("moefx: the model output holds no floating-point tensor")


def logits_of(output: Any) -> Optional[Tensor]:
    """The next-token logits [B, S, V] of a model output (``.logits``), or None when it has none."""
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) and logits.dim() == 3 else None


def token_mask(batch: Any, shape: torch.Size) -> Optional[Tensor]:
    """Which rows of a per-token tensor of ``shape`` are real tokens (not padding), from a dict batch's
    ``attention_mask`` [B, S]: a bool [B, S] for [B, S, ...], [B*S] for [B*S, ...]; None when the batch
    has no mask or the tensor is not per token."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, Tensor) or mask.dim() != 2 or len(shape) < 2:
        return None
    if tuple(shape[:2]) == tuple(mask.shape):
        return mask.bool()
    if shape[0] == mask.numel():
        return mask.reshape(-1).bool()
    return None


@contextlib.contextmanager
def hooks(*registrations: Callable[[], Any]) -> Iterator[None]:
    """Register hooks (each callable returns a removable handle) for the ``with`` body only."""
    handles = []
    try:
        for register in registrations:
            handles.append(register())
        yield
    finally:
        for handle in handles:
            handle.remove()
