"""GGUF out: a decoder-only lmforge model as one file that llama.cpp (and so Ollama) runs.

GGUF is llama.cpp's format: metadata (architecture hyper-parameters, the tokenizer's
vocabulary, merges and special ids, the chat template) followed by tensors in llama.cpp's
names, each f32, f16 or block-quantised (q8_0: blocks of 32 weights, one f16 scale each).
It is written through the `gguf` package, llama.cpp's own writer. The names and metadata
keys below are llama.cpp's; this module is the only place they appear.

    lmforge convert runs/gpt/model gpt.gguf --to gguf --dtype q8_0
    llama-cli -m gpt.gguf -p "ROMEO:"

Two architectures: GPT-2 (learned positions, LayerNorm, fused QKV, GELU-tanh MLP, biases) and
Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention). llama.cpp applies RoPE to
interleaved pairs of features where transformers and lmforge rotate the two halves of each
head, so the Llama query and key rows are permuted on the way out, exactly as llama.cpp's
own converter does. Tokenizers: byte-level BPE with GPT-2's pre-tokenizer (what lmforge
trains for decoders); others are refused with the reason.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from lmforge.files import atomic_path
from lmforge.interop.convert import ConversionError
from lmforge.interop.hf import model_type_of
from lmforge.models import GPTConfig
from lmforge.models.provenance import untrained
from lmforge.tokenizer import Tokenizer

DTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
T = gguf.MODEL_TENSOR


def _name(tensor: gguf.MODEL_TENSOR, block: int | None = None, part: str = "weight") -> str:
    return f"{gguf.TENSOR_NAMES[tensor].format(bid=block)}.{part}"


# ----------------------------------------------------------------------------- tensors


def permute_for_rope(w: Tensor, n_heads: int) -> Tensor:
    """Query/key rows from rotate-half order (feature i pairs with i + Dh/2) to llama.cpp's
    interleaved order (2i pairs with 2i+1), per head. w: (n_heads * Dh, ...) or (n_heads * Dh,)."""
    return w.reshape(n_heads, 2, w.size(0) // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _parts(name: str, value: Tensor, c: GPTConfig, kind: str) -> list[tuple[str, Tensor]]:
    """One lmforge block tensor (blocks.i.x.y) -> its GGUF tensor(s)."""
    _, i, module, *rest = name.split(".")
    b, part = int(i), rest[-1]
    sub = ".".join([module, *rest[:-1]])
    if sub == "attn.wqkv" and kind == "llama":
        q, k, v = value.split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim])
        return [(_name(T.ATTN_Q, b, part), permute_for_rope(q, c.n_heads)),
                (_name(T.ATTN_K, b, part), permute_for_rope(k, c.n_kv_heads)), (_name(T.ATTN_V, b, part), v)]
    table = {"attn_norm": T.ATTN_NORM, "mlp_norm": T.FFN_NORM, "attn.wqkv": T.ATTN_QKV, "attn.wo": T.ATTN_OUT,
             "mlp.up": T.FFN_UP, "mlp.down": T.FFN_DOWN, "mlp.gate": T.FFN_GATE}
    if sub not in table:
        raise ConversionError(f"GGUF export: no llama.cpp tensor for lmforge's {name}")
    return [(_name(table[sub], b, part), value)]


def gguf_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors under llama.cpp's names, float32, in PyTorch's (out, in) layout
    (the writer stores GGML's reversed dimension order itself); the padded vocabulary rows cut."""
    c, kind = model.config, model_type_of(model.config)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {_name(T.TOKEN_EMBD): state["tok_emb.weight"][:c.vocab_size]}
    if kind == "gpt2":
        out[_name(T.POS_EMBD)] = state["pos_emb.weight"]
    for name, value in state.items():
        if name.startswith("blocks."):
            out.update(_parts(name, value, c, kind))
    out[_name(T.OUTPUT_NORM)] = state["norm_f.weight"]
    if "norm_f.bias" in state:
        out[_name(T.OUTPUT_NORM, part="bias")] = state["norm_f.bias"]
    if kind == "gpt2" or not c.tie_embeddings:  # llama.cpp's Llama reuses token_embd when output is absent
        out[_name(T.OUTPUT)] = state["lm_head.weight"][:c.vocab_size]
    if c.rope_scaling:
        out[_name(T.ROPE_FREQS)] = llama3_rope_factors(c)
    return out


def llama3_rope_factors(c: GPTConfig) -> Tensor:
    """Llama 3.1's per-frequency RoPE divisors (1 for high frequencies, `factor` for low ones,
    smooth between), the tensor llama.cpp reads as rope_freqs."""
    s = c.rope_scaling
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
    wavelen = 2 * math.pi / inv_freq
    old = s["original_max_position_embeddings"]
    low, high = old / s["low_freq_factor"], old / s["high_freq_factor"]
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    mid = 1 / ((1 - smooth) / s["factor"] + smooth)
    factors = torch.where(wavelen < high, torch.ones_like(wavelen), torch.where(wavelen > low, s["factor"], mid))
    return factors.float()


def _encoded(value: Tensor, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor in the file's dtype: vectors (norms, biases, RoPE factors) stay f32, as in
    llama.cpp's converter; a matrix whose rows do not split into 32-wide q8_0 blocks falls back to f16."""
    array = value.numpy()
    if array.ndim < 2 or dtype == "f32":
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


# ----------------------------------------------------------------------------- metadata


def _check_model(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if not isinstance(config, GPTConfig):
        what = "a model with a task head" if hasattr(model, "backbone") else f"a {type(model).__name__}"
        raise ConversionError(f"GGUF export covers decoder-only language models (GPT-2, Llama); this is {what}")
    kind = model_type_of(config)
    if kind == "gpt2" and config.act != "gelu_tanh":
        raise ConversionError(f"GGUF export: llama.cpp's GPT-2 uses GELU (tanh); this model's act is {config.act}")
    if "lm_head.weight" in untrained(model):
        raise ConversionError("GGUF export: the LM head was never loaded nor trained (a backbone-only checkpoint); "
                              "a GGUF of it would generate noise")
    return kind


def _hyperparameters(w: gguf.GGUFWriter, c: GPTConfig, kind: str) -> None:
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_block_count(c.n_layers)
    w.add_head_count(c.n_heads)
    if kind == "gpt2":
        w.add_layer_norm_eps(c.norm_eps)
        return
    w.add_head_count_kv(c.n_kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    if c.head_dim * c.n_heads != c.dim:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (its split regex)."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    raise ConversionError(f"GGUF export: pre-tokenizer {json.dumps(spec)} has no llama.cpp equivalent lmforge "
                          "knows (byte-level BPE with GPT-2's split, as lmforge trains, is supported)")


def _tokenizer_metadata(w: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Vocabulary (padded to the model's rows), token types, merges, special ids, chat template."""
    spec = json.loads(tokenizer.backend.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConversionError(f"GGUF export: a {spec['model']['type']} tokenizer; llama.cpp's GPT-2 vocabulary "
                              "needs byte-level BPE")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i)
        if token is None:  # rows beyond the tokenizer: never produced, named as llama.cpp's converter does
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    probe = tokenizer.encode("a", add_special_tokens=True)
    for key, value in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(tokenizer.bos_id is not None and probe[:1] == [tokenizer.bos_id])
    w.add_add_eos_token(tokenizer.eos_id is not None and probe[-1:] == [tokenizer.eos_id])
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


# ----------------------------------------------------------------------------- the file


def is_gguf(path: Path) -> bool:
    """A file that starts with GGUF's magic bytes."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def write_gguf(model: nn.Module, tokenizer: Tokenizer | None, path: str | os.PathLike, dtype: str = "f16",
               name: str | None = None, overwrite: bool = False) -> Path:
    """Write a decoder-only model and its tokenizer as one GGUF file (atomically).
    dtype: f32, f16 or q8_0 (matrices; vectors stay f32). Merge LoRA adapters first. An
    existing GGUF file at `path` is replaced; any other file only with overwrite."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(path)
    if path.is_dir() or path.suffix != ".gguf":
        raise ValueError(f"{path}: give the GGUF file to write, a name ending in .gguf")
    if path.exists() and not overwrite and not is_gguf(path):
        raise ValueError(f"{path}: exists and is not a GGUF file; pass overwrite to replace it")
    kind = _check_model(model)
    if tokenizer is None:
        raise ValueError("GGUF export needs the model's tokenizer (llama.cpp reads the vocabulary from the file)")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}")
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[{"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA}
                                                      [kind]])
        w.add_name(name or path.stem)
        w.add_file_type(DTYPES[dtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hyperparameters(w, model.config, kind)
        _tokenizer_metadata(w, tokenizer, model.config.vocab_size)
        for tensor_name, value in gguf_tensors(model).items():
            data, qtype = _encoded(value, dtype)
            w.add_tensor(tensor_name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
