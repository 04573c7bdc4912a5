"""The LM facade: a model, its tokenizer and its config, loaded and saved in either
lmforge's format or Hugging Face's.

    lm = lmforge.load("runs/quickstart/model")        # lmforge or HF directory
    lm.save("out/hf", format="hf")                    # loads in transformers
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from lmforge.generate.chat import chat_prompt
from lmforge.generate.text import generate_text, stream_text
from lmforge.interop.model_dir import LoadedModel, load_model, save_model_dir
from lmforge.interop.peft import load_adapter
from lmforge.nn import quant
from lmforge.nn.lora import merge_lora
from lmforge.tokenizer import Tokenizer


class LM(LoadedModel):
    """A model with what it needs around it (lmforge.interop.model_dir.LoadedModel: model,
    tokenizer, head, special ids, path), and what a user does with it: generate, stream,
    chat, move, save."""

    def _needs_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and this model directory has none")
        return self.tokenizer

    def generate(self, prompts: str | list[str], max_new_tokens: int = 64, **options) -> list[str] | list[list[str]]:
        """Continue each prompt (GPT) or transform each source (EncoderDecoder); returns the new
        text per prompt. Options: temperature, top_k, top_p, repetition_penalty,
        no_repeat_ngram_size, num_beams, length_penalty, num_return_sequences, stop, seed, ...
        (see lmforge.generate.text.generate_text). temperature=0 (the default) is greedy, unless
        the model's generation_config.json asks for sampling (do_sample, temperature, top_k,
        top_p, as transformers' generate applies them); options given here win."""
        return generate_text(self.backbone, self._needs_tokenizer("generate"), prompts, max_new_tokens,
                             **self._options(options))

    def stream(self, prompt: str, max_new_tokens: int = 64, **options) -> Iterator[str]:
        """Yield the new text of one prompt piece by piece as it is generated."""
        return stream_text(self.backbone, self._needs_tokenizer("stream"), prompt, max_new_tokens,
                           **self._options(options))

    def _options(self, options: dict) -> dict:
        """The model's own sampling defaults (generation_config.json) under the caller's options
        (none of them for beam search or an explicit temperature=0: those are deterministic)."""
        defaults = sampling_defaults(self.generation)
        if options.get("num_beams", 1) > 1 or options.get("temperature") == 0:
            defaults = {k: v for k, v in defaults.items() if k == "repetition_penalty"}
        return {**defaults, **options}

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 256, **options) -> str:
        """One assistant reply to chat messages [{"role": ..., "content": ...}], rendered with
        the tokenizer's chat template."""
        prompt = chat_prompt(self._needs_tokenizer("chat"), messages)
        return self.generate(prompt, max_new_tokens, add_special_tokens=False, **options)[0]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LM:
        self.model.to(device=device, dtype=dtype)  # quantised (integer) weights keep their type
        return self

    def quantize(self, kind: str) -> LM:
        """Weight-only int8 / int4 linear layers for decoding, in place (as load(quantize=))."""
        if kind != "none":
            _quantize(self.model, kind)
        return self

    def save(self, path: str | os.PathLike, format: str = "lmforge", overwrite: bool = False,
             max_shard_size: int | str = "5GB") -> Path:
        """Write the model (and tokenizer) to a directory, atomically.

        format="lmforge": config.json + model.safetensors in lmforge's names;
        format="hf": config.json + model.safetensors that transformers' Auto classes load.
        An existing model directory has its model files replaced and nothing else; any other
        non-empty directory is refused unless overwrite=True (then same-named files are
        replaced and nothing is deleted). format="hf" writes shards with an index above
        max_shard_size, as transformers does.
        """
        if quant.quantization_of(self.model) is not None:
            raise ValueError(f"this model is quantised ({quant.quantization_of(self.model)}) for decoding; save the "
                             "checkpoint it was loaded from (load it without quantize=) instead")
        return save_model_dir(path, self.model, head=self.head, tokenizer=self.tokenizer, format=format,
                              special=self.special, overwrite=overwrite, max_shard_size=max_shard_size,
                              generation=self.generation)


def sampling_defaults(generation: dict) -> dict:
    """lmforge's generate options from generation_config.json's settings, with transformers'
    meaning: do_sample turns sampling on (temperature 1 and top_k 50 unless set there);
    a repetition penalty applies either way."""
    out: dict = {}
    if generation.get("do_sample"):
        out["temperature"] = float(generation.get("temperature") or 1.0)
        out["top_k"] = generation.get("top_k", 50) or None
        if generation.get("top_p") is not None and generation["top_p"] < 1:
            out["top_p"] = float(generation["top_p"])
    if generation.get("repetition_penalty") not in (None, 1, 1.0):
        out["repetition_penalty"] = float(generation["repetition_penalty"])
    return out


def load(path: str | os.PathLike, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, adapter: str | os.PathLike | None = None,
         quantize: str | None = None) -> LM:
    """Load an lmforge checkpoint directory or a Hugging Face model directory
    (model_type gpt2, llama, bert or bart, or a Hub id) into an LM. adapter: a PEFT LoRA adapter
    directory (adapter_config.json + adapter_model.safetensors, from peft or lmforge finetune) for
    this base, merged into the weights (lmforge.interop.peft.load_adapter keeps it apart).

    dtype: the compute dtype, the weights kept in it (None: float32; "float32", "bfloat16",
    "float16", or "auto": the checkpoint's own). quantize: None / "none", "int8" (weight-only, per output
    channel) or "int4" (groupwise, CPU) for decoding -- the linear layers' weights in that many
    bits, activations, norms and the KV cache in `dtype` (lmforge.nn.quant); a quantised model
    generates, serves and evaluates but is not saved or trained."""
    quantize = None if quantize == "none" else quantize
    if quantize is not None and quantize not in quant.QUANTIZATIONS:
        raise ValueError(f"quantize: unknown {quantize!r} (expected one of {', '.join(quant.QUANTIZATIONS)})")
    loaded = load_model(path, dtype)
    if adapter is not None:
        loaded.model, loaded.head = load_adapter(loaded.model, loaded.head, adapter)
        merge_lora(loaded.model)
    lm = LM(loaded.model.eval(), loaded.tokenizer, loaded.head, loaded.special, loaded.path, loaded.generation)
    lm.to(device, None if dtype == "auto" else getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return lm if quantize is None else lm.quantize(quantize)


def _quantize(model: torch.nn.Module, kind: str) -> None:
    if quant.quantization_of(model) is not None:
        raise ValueError(f"quantize: this model is already quantised ({quant.quantization_of(model)})")
    if kind == "int4" and next(model.parameters()).device.type != "cpu":
        raise ValueError("quantize='int4' runs on the CPU only (torch's int4 kernel for it); use int8 or a dtype")
    quant.quantize(model, kind)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, overwrite: bool = False,
            dtype: str | None = None, adapter: str | os.PathLike | None = None) -> Path:
    """Re-save a model directory in another format: to="hf" or to="lmforge" (dst as in LM.save),
    or to="gguf" (dst: a .gguf file for llama.cpp; dtype f32, f16 (default) or q8_0). adapter: a
    PEFT adapter merged in first."""
    lm = load(src, adapter=adapter)
    if to == "gguf":
        from lmforge.interop.gguf import write_gguf  # the gguf package is read only for this export

        return write_gguf(lm.model, lm.tokenizer, dst, dtype or "f16", overwrite=overwrite)
    if dtype is not None:
        raise ValueError("dtype applies to --to gguf only")
    return lm.save(dst, format=to, overwrite=overwrite)
