"""Small real architectures (random weights unless stated) and their calibration inputs."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class PlainFFN(torch.nn.Module):
    """A bare 16 -> 64 -> 16 GELU FFN: the smallest model moefx converts."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def main_output(output) -> torch.Tensor:
    """The hidden-state tensor of a transformers/diffusers output object, tuple or tensor."""
    for name in ("last_hidden_state", "sample", "logits"):
        if hasattr(output, name):
            return getattr(output, name)
    return output[0] if isinstance(output, tuple) else output


def _gpt2():
    from transformers import GPT2Config, GPT2Model
    model = GPT2Model(GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=200, n_positions=64))
    return model, lambda g: {"input_ids": torch.randint(0, 200, (2, 7), generator=g)}, 2, "gelu_tanh"


def _llama():
    from transformers import LlamaConfig, LlamaModel
    model = LlamaModel(LlamaConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=200))
    return model, lambda g: {"input_ids": torch.randint(0, 200, (2, 7), generator=g)}, 2, "silu"


def _qwen3():
    from transformers import Qwen3Config, Qwen3Model
    model = Qwen3Model(Qwen3Config(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=12, vocab_size=200))
    return model, lambda g: {"input_ids": torch.randint(0, 200, (2, 7), generator=g)}, 2, "silu"


def _vit():
    from transformers import ViTConfig, ViTModel
    model = ViTModel(ViTConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                               image_size=32, patch_size=8))
    return model, lambda g: {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}, 2, "gelu"


def _dit():
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)
    return model, lambda g: {"hidden_states": torch.randn(2, 4, 8, 8, generator=g),
                             "timestep": torch.randint(0, 1000, (2,), generator=g),
                             "class_labels": torch.randint(0, 10, (2,), generator=g)}, 2, "gelu_tanh"


def _minilm():
    from moefx.demo import load_minilm, tokenize
    from moefx.data import python_doc_sentences
    model, tokenizer = load_minilm()
    sentences = python_doc_sentences(64)

    def inputs(g):
        start = int(torch.randint(0, 56, (1,), generator=g))
        return tokenize(tokenizer, sentences[start:start + 8], 8)[0]
    return model, inputs, 6, "gelu"


ARCHITECTURES = {"minilm": _minilm, "gpt2": _gpt2, "llama": _llama, "qwen3": _qwen3, "vit": _vit, "dit": _dit}


@pytest.fixture(params=list(ARCHITECTURES))
def architecture(request):
    """(name, model in eval mode, input factory taking a torch.Generator, true FFN count, activation)."""
    torch.manual_seed(0)
    model, make_inputs, num_ffns, activation = ARCHITECTURES[request.param]()
    return request.param, model.eval(), make_inputs, num_ffns, activation
