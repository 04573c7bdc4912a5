"""A stand-in for HuggingFaceTB/SmolLM2-135M-Instruct in a Hugging Face cache, for machines
without a network (the worked example docs/examples/sft-lora.md was measured on one).

    python scripts/standin_hub_model.py --cache hub-cache
    HF_HUB_CACHE=hub-cache HF_HUB_OFFLINE=1 lmforge generate --model HuggingFaceTB/SmolLM2-135M-Instruct ...

What is real: the architecture (SmolLM2-135M's config.json values: 30 Llama blocks of width
576, 9 query and 3 key/value heads, 49,152 embedding rows, tied), bf16 weights as the Hub
stores them, a ChatML chat template whose turns end in <|im_end|>, which is also the
padding token (pad = eos, as SmolLM2's), and the cache layout huggingface_hub leaves
(models--org--name/{blobs,refs,snapshots}). What is not: the weights are random and the
tokenizer is a byte-level BPE trained here on Tiny Shakespeare (8,192 ids, fewer than the
model's rows, as checkpoints pad their tables; its special ids differ from SmolLM2's), so
times and memory are those of the real model, while losses and replies are not.
"""

from __future__ import annotations

import argparse
import importlib.resources
import tempfile
from pathlib import Path

import torch
import transformers

from lmforge.hub import lay_out
from lmforge.tokenizer import train_tokenizer

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
              rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
              hidden_act="silu")
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, type=Path, help="the Hugging Face cache directory to fill")
    args = parser.parse_args()
    text = importlib.resources.files("lmforge").joinpath("corpus/tinyshakespeare.txt").read_text()
    tokenizer = train_tokenizer(text.split("\n\n"), "bpe", 8192,
                                special_tokens=["<|endoftext|>", "bos=<|im_start|>", "eos=<|im_end|>",
                                                "pad=<|im_end|>"])
    tokenizer.chat_template = CHATML
    ids = {f"{role}_token_id": tokenizer.token_to_id(t) for role, t in
           [("bos", "<|im_start|>"), ("eos", "<|im_end|>"), ("pad", "<|im_end|>")]}  # this tokenizer's ids
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CONFIG, **ids})).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
        print(lay_out(args.cache, REPO, Path(tmp)))


if __name__ == "__main__":
    main()
