"""Conversion from disk: ``moefx convert`` on a Llama-3.2-3B-shaped checkpoint (random bf16 weights).

Writes a sharded safetensors checkpoint per depth (hidden 3072, FFN 8192 SwiGLU, 24 heads / 8 KV heads,
vocab 128256, tied embeddings: ~6.4 GB at 28 layers), converts each with the command line in a child
process at 8 experts / top-2 / 1 shared, and prints wall time and the child's peak RSS against the
checkpoint's size. Targets (issue 14, 2-core CPU): peak RSS <= 1.5 GB at 28 layers, <= 15 minutes, and the
peak RSS of 8 and 28 layers within 10% of each other (memory independent of depth).

    python bench/bench_convert.py                       # 8 and 28 layers, 8192 calibration tokens
    python bench/bench_convert.py --layers 4 8 --tokens 1024 --dir /tmp/bench_convert
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch


def write_checkpoint(path: str, layers: int, hidden: int, ffn: int, vocab: int, seed: int = 0) -> int:
    """A LlamaForCausalLM checkpoint with random bf16 weights, one shard per block, written tensor by tensor
    (the model is never built: its tensor names and shapes come from a meta-device instance). Returns bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moefx.shards import ShardWriter

    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=min(8, hidden // 128), head_dim=128, vocab_size=vocab,
                         tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072, dtype="bfloat16",
                         bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    os.makedirs(path, exist_ok=True)
    writer = ShardWriter(path, layers + 1)
    generator = torch.Generator().manual_seed(seed)

    def tensor(name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shapes[name], dtype=torch.bfloat16)
        return (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)

    for i in range(layers):
        writer.write(i + 1, {k: tensor(k) for k in shapes if k.startswith(f"model.layers.{i}.")})
    writer.write(layers + 1, {k: tensor(k) for k in shapes if not k.startswith("model.layers.")})
    writer.finish()
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    _write_tokenizer(path, vocab)
    return writer.total_size


def _write_tokenizer(path: str, vocab: int) -> None:
    """A byte-level BPE tokenizer trained on Python's documentation (its ids are a subset of the vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moefx.data import python_doc_sentences

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(python_doc_sentences(1750), trainers.BpeTrainer(
        vocab_size=min(vocab, 4000), special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def convert_in_child(src: str, dst: str, args: argparse.Namespace) -> tuple[float, int, str]:
    """Run ``moefx convert`` in a fresh process: (wall seconds, its peak RSS in bytes, its output)."""
    cli = ["convert", src, dst, "--experts", str(args.experts), "--top-k", str(args.top_k), "--shared",
           str(args.shared), "--calibration-tokens", str(args.tokens), "--quiet"]
    # the child reports its own VmHWM: ru_maxrss of a child also counts the parent's memory at the fork
    command = [sys.executable, "-c", "import sys; from moefx.cli import main; code = main(sys.argv[1:]); "
               "print('VmHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); "
               "sys.exit(code)", *cli]
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        child.wait()
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    if child.returncode:
        raise SystemExit(f"moefx convert failed:\n{output}")
    peak = int(output.rsplit("VmHWM", 1)[1].split()[0]) * 1024
    return seconds, peak, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 28])
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--shared", type=int, default=1)
    parser.add_argument("--dir", default="/tmp/moefx_bench_convert", help="where the checkpoints are written "
                        "(removed afterwards)")
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the "
          f"start, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"Llama-shaped: hidden {args.hidden}, FFN {args.ffn}, vocab {args.vocab}, bf16; {args.experts} experts, "
          f"top-{args.top_k}, {args.shared} shared; {args.tokens} calibration tokens")
    print(f"{'layers':>6} {'checkpoint':>10} {'write s':>8} {'convert s':>9} {'s/block':>8} {'peak RSS':>9} "
          f"{'RSS/ckpt':>8}")
    peaks = {}
    for layers in args.layers:
        src, dst = os.path.join(args.dir, f"dense-{layers}"), os.path.join(args.dir, f"moe-{layers}")
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        start = time.perf_counter()
        size = write_checkpoint(src, layers, args.hidden, args.ffn, args.vocab)
        written = time.perf_counter() - start
        try:
            seconds, peak, output = convert_in_child(src, dst, args)
        finally:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
        peaks[layers] = peak
        print(f"{layers:>6} {size / 1e9:>9.2f}G {written:>8.1f} {seconds:>9.1f} {seconds / layers:>8.1f} "
              f"{peak / 1e9:>8.2f}G {peak / size:>8.2f}", flush=True)
    if len(peaks) > 1:
        low, high = min(peaks), max(peaks)
        print(f"peak RSS {high} layers / {low} layers: {peaks[high] / peaks[low]:.3f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
