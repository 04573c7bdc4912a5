"""GGUF export: gguf's own reader (the one llama.cpp's tools use) reads back every tensor (f32
exactly, f16 and dequantised q8_0 within their precision) and the metadata llama.cpp needs:
hyper-parameters, the tokenizer's vocabulary, merges, token types, special ids and chat
template. Running the files in llama.cpp itself is bench/gguf_llamacpp.py."""

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import lmforge
from lmforge.interop.gguf import gguf_tensors, permute_for_rope, write_gguf
from lmforge.interop.model_dir import save_model_dir
from lmforge.models import BertConfig, GPTConfig, build
from lmforge.models.provenance import set_untrained
from lmforge.tokenizer import train_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
         "to be or not to be, that is the question", "all that glitters is not gold"] * 20
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(texts=TEXTS, kind="bpe", vocab_size=300, min_frequency=1)
    tok.chat_template = TEMPLATE
    return tok


def _model(tok, family, **kw):
    torch.manual_seed(0)
    # 5 rows past the tokenizer
    shape = dict(vocab_size=tok.vocab_size + 5, max_seq_len=64, dim=64, n_layers=2, n_heads=4)
    if family == "llama":
        shape.update(positions="rope", norm="rmsnorm", mlp="swiglu", act="silu", bias=False, n_kv_heads=2,
                     hidden_dim=96, tie_embeddings=False)
    else:
        shape.update(act="gelu_tanh")
    return build(GPTConfig(**{**shape, **kw}))


def _fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_f32_round_trip_through_ggufs_reader(family, tokenizer, tmp_path):
    model = _model(tokenizer, family)
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    meta = _fields(reader)
    c = model.config
    assert meta["general.architecture"] == family and meta["general.file_type"] == 0
    assert meta[f"{family}.block_count"] == 2 and meta[f"{family}.embedding_length"] == 64
    assert meta[f"{family}.context_length"] == 64 and meta[f"{family}.attention.head_count"] == 4
    assert meta[f"{family}.feed_forward_length"] == c.hidden_dim
    if family == "llama":
        assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.rope.dimension_count"] == 16
        assert meta["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
        assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == c.vocab_size and tokens[:tokenizer.vocab_size] == [
        tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    assert tokens[-1] == f"[PAD{c.vocab_size - 1}]"
    types = meta["tokenizer.ggml.token_type"]
    assert types[tokenizer.eos_id] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert types[tokenizer.encode("the")[0]] == gguf.TokenType.NORMAL
    merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_id
    assert meta["tokenizer.chat_template"] == TEMPLATE
    # every tensor, exactly: llama.cpp's names, GGML's reversed shape
    state = model.state_dict()
    got = {t.name: t for t in reader.tensors}
    expected = gguf_tensors(model)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert tuple(int(d) for d in got[name].shape) == tuple(reversed(value.shape)), name
        assert np.array_equal(np.asarray(got[name].data).reshape(value.shape), value.numpy()), name
    assert torch.equal(expected["token_embd.weight"], state["tok_emb.weight"][:c.vocab_size])
    if family == "llama":  # q/k rows interleaved per head; v as it is
        q = state["blocks.0.attn.wqkv.weight"][:64]
        assert torch.equal(expected["blk.0.attn_q.weight"][:, 0], torch.stack(
            [q.view(4, 2, 8, 64)[h, half, i, 0] for h in range(4) for i in range(8) for half in (0, 1)]))
        assert "output.weight" in expected and "blk.1.ffn_gate.weight" in expected
    else:
        assert torch.equal(expected["blk.1.attn_qkv.bias"], state["blocks.1.attn.wqkv.bias"])
        assert torch.equal(expected["output.weight"], expected["token_embd.weight"])  # tied: written twice


def test_permutation_pairs_rotate_half_features():
    """A head of 4 features (0 1 | 2 3: 0 pairs with 2, 1 with 3) becomes 0 2 1 3."""
    w = torch.arange(8.0)[:, None]  # two heads
    assert permute_for_rope(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("dtype, tolerance", [("f16", 1e-3), ("q8_0", 2e-2)])
def test_f16_and_q8_0_read_back_within_their_precision(dtype, tolerance, tokenizer, tmp_path):
    model = _model(tokenizer, "llama")
    reader = gguf.GGUFReader(write_gguf(model, tokenizer, tmp_path / "m.gguf", dtype))
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    assert _fields(reader)["general.file_type"] == {"f16": 1, "q8_0": 7}[dtype]
    expected = gguf_tensors(model)
    for t in reader.tensors:
        want = expected[t.name].numpy()
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
        else:
            assert t.tensor_type == qtype, t.name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert np.abs(got - want).max() <= tolerance * max(1.0, np.abs(want).max()), t.name


def test_llama3_rope_scaling_writes_rope_factors(tokenizer, tmp_path):
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    model = _model(tokenizer, "llama", rope_scaling=scaling)
    reader = gguf.GGUFReader(write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32"))
    factors = next(np.asarray(t.data) for t in reader.tensors if t.name == "rope_freqs.weight")
    from lmforge.nn.position import rope_frequencies

    plain = rope_frequencies(16, model.config.rope_theta)
    scaled = rope_frequencies(16, model.config.rope_theta, scaling)
    assert np.allclose(factors, (plain / scaled).numpy(), rtol=1e-5)  # llama.cpp divides by them


def test_what_llama_cpp_cannot_run_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="decoder-only language models"):
        write_gguf(build(BertConfig(vocab_size=400, max_seq_len=32, dim=32, n_layers=1, n_heads=2)), tokenizer,
                   tmp_path / "b.gguf")
    backbone = _model(tokenizer, "llama")
    set_untrained(backbone, {"lm_head.weight"})
    with pytest.raises(ValueError, match="never loaded nor trained"):
        write_gguf(backbone, tokenizer, tmp_path / "l.gguf")
    wordpiece = train_tokenizer(texts=TEXTS, kind="wordpiece", vocab_size=200, min_frequency=1)
    with pytest.raises(ValueError, match="WordPiece tokenizer"):
        write_gguf(_model(tokenizer, "gpt2"), wordpiece, tmp_path / "w.gguf")
    with pytest.raises(ValueError, match="ending in .gguf"):
        write_gguf(_model(tokenizer, "gpt2"), tokenizer, tmp_path)
    (tmp_path / "notes.gguf").write_text("my notes")
    with pytest.raises(ValueError, match="not a GGUF file"):
        write_gguf(_model(tokenizer, "gpt2"), tokenizer, tmp_path / "notes.gguf")
    assert (tmp_path / "notes.gguf").read_text() == "my notes"


def test_cli_converts_a_model_directory(tokenizer, tmp_path):
    src = save_model_dir(tmp_path / "model", _model(tokenizer, "gpt2"), tokenizer=tokenizer, format="hf")
    run = subprocess.run([sys.executable, "-m", "lmforge", "convert", str(src), str(tmp_path / "m.gguf"), "--to",
                          "gguf", "--dtype", "q8_0"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert _fields(reader)["general.file_type"] == 7
    again = subprocess.run([sys.executable, "-m", "lmforge", "convert", str(src), str(tmp_path / "x.txt"), "--to",
                            "gguf"], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "ending in .gguf" in again.stderr
    assert Path(lmforge.api.convert(src, tmp_path / "m.gguf", "gguf")).is_file()  # a GGUF file is replaced
