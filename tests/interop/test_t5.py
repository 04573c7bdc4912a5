"""T5 (v1.0; v1.1 / Flan-T5; mT5) against transformers on the same random weights, fp32 on CPU:
logits of directories transformers wrote, directories lmforge wrote loaded by transformers,
cached decoding, parameter counts, and the SentencePiece-Unigram tokenizer T5 ships."""

from __future__ import annotations

import pytest
import torch
import transformers as hf
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from torch.testing import assert_close

import lmforge
from lmforge.interop.convert import ConversionError
from lmforge.interop.hf import from_hf, from_transformers, to_hf
from lmforge.models import PRESETS, T5, T5Config, build, count_params, preset
from lmforge.models.arch import arch_of
from lmforge.tokenizer import Tokenizer

V = 97  # not a multiple of 128: exercises vocabulary padding

VARIANTS = {  # (class, config fields): v1.0 ties and rescales; v1.1 and mT5 have a head of their own
    "t5-v1.0": (hf.T5ForConditionalGeneration, dict(feed_forward_proj="relu", tie_word_embeddings=True)),
    "t5-v1.1": (hf.T5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "mt5": (hf.MT5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
}


def _theirs(variant: str, seed: int = 0) -> hf.PreTrainedModel:
    cls, kw = VARIANTS[variant]
    config_cls = hf.MT5Config if cls is hf.MT5ForConditionalGeneration else hf.T5Config
    cfg = config_cls(vocab_size=V, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20, pad_token_id=0,
                     eos_token_id=1, decoder_start_token_id=0, **kw)
    torch.manual_seed(seed)
    model = cls(cfg)
    if not kw["tie_word_embeddings"]:  # transformers 5 ties a fresh model's head whatever the config says
        model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32))
    return model.eval()


def _batch(B=3, S=13, T=7):
    src = torch.randint(2, V, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 4:], mask[2, S - 8:] = 0, 0  # right padding of different lengths
    return src.masked_fill(mask == 0, 0), mask, torch.randint(2, V, (B, T))


def _logits(model, src, mask, tgt):
    with torch.no_grad():
        if isinstance(model, T5):
            return model(src, tgt, mask)
        return model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_encoder_output_match(variant):
    theirs = _theirs(variant)
    ours = from_transformers(theirs).eval()
    assert ours.config.tie_embeddings == (variant == "t5-v1.0") == ours.config.scale_head_input
    src, mask, tgt = _batch()
    assert_close(_logits(ours, src, mask, tgt), _logits(theirs, src, mask, tgt), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        memory = theirs.encoder(src, attention_mask=mask).last_hidden_state
        keep = mask.bool()
        assert_close(ours.encode(src, mask)[keep], memory[keep], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reads_what_transformers_saved(tmp_path, variant):
    theirs = _theirs(variant)
    theirs.save_pretrained(tmp_path / "m")
    lm = lmforge.load(tmp_path / "m")
    assert lm.family == "t5" and isinstance(lm.model, T5)
    src, mask, tgt = _batch()
    assert_close(_logits(lm.model.eval(), src, mask, tgt), _logits(theirs, src, mask, tgt), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False], ids=["v1.0", "v1.1"])
def test_transformers_loads_what_lmforge_writes(tmp_path, tied):
    fields = {} if tied else dict(mlp="gated", act="gelu_tanh", tie_embeddings=False, scale_head_input=False)
    torch.manual_seed(0)
    ours = T5(T5Config(vocab_size=V, dim=32, n_layers=2, n_decoder_layers=3, n_heads=4, head_dim=6, hidden_dim=48,
                       relative_buckets=8, relative_max_distance=20, **fields)).eval()
    path = lmforge.LM(ours).save(tmp_path / "m", format="hf")
    theirs = hf.AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    assert type(theirs) is hf.T5ForConditionalGeneration
    assert (theirs.lm_head.weight is theirs.shared.weight) == tied
    src, mask, tgt = _batch()
    assert_close(_logits(theirs, src, mask, tgt), _logits(ours, src, mask, tgt), atol=1e-4, rtol=1e-4)
    again = lmforge.load(path).model  # and back: the same model
    assert again.config == ours.config


@pytest.mark.parametrize("variant", ["t5-v1.0", "t5-v1.1"])
def test_round_trip_reproduces_every_tensor(variant):
    theirs = _theirs(variant)
    ours, head, _ = from_hf({**theirs.config.to_dict(), "architectures": [type(theirs).__name__]},
                            dict(theirs.state_dict()))
    cfg, tensors = to_hf(ours, head)
    assert cfg["architectures"] == ["T5ForConditionalGeneration"] and cfg["model_type"] == "t5"
    original = theirs.state_dict()
    for name, value in tensors.items():
        assert_close(value, original[name], atol=0, rtol=0, msg=f"tensor {name} differs after the round trip")
    # every checkpoint tensor is written but the tied copies transformers restores itself
    assert set(original) - set(tensors) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                            "lm_head.weight"}


def test_mt5_exports_as_t5_with_the_same_logits():
    theirs = _theirs("mt5")
    cfg, tensors = to_hf(from_transformers(theirs))
    assert cfg["model_type"] == "t5" and cfg["scale_decoder_outputs"] is False
    rebuilt = hf.T5ForConditionalGeneration(hf.T5Config.from_dict(cfg)).eval()
    rebuilt.lm_head.weight = torch.nn.Parameter(torch.empty(V, 32))
    rebuilt.load_state_dict(tensors, strict=False)
    src, mask, tgt = _batch()
    assert_close(_logits(rebuilt, src, mask, tgt), _logits(theirs, src, mask, tgt), atol=1e-4, rtol=1e-4)


def test_cached_decoding_equals_full_recomputation():
    """One token at a time through the KV cache (the causal position bias of each new query
    against the slots so far) gives the logits of one full teacher-forced pass."""
    ours = from_transformers(_theirs("t5-v1.1")).eval()
    src, mask, tgt = _batch()
    with torch.no_grad():
        full = ours(src, tgt, mask)
        memory_kv = ours.project_memory(ours.encode(src, mask))
        cache = ours.make_cache(src.size(0), 16)
        steps = []
        for t in range(tgt.size(1)):
            slots = torch.ones(src.size(0), t + 1, dtype=torch.bool)
            hidden = ours.decode(tgt[:, t:t + 1], None, mask, decoder_attention_mask=slots, memory_kv=memory_kv,
                                 cache=cache, cache_pos=torch.tensor([t]))
            steps.append(ours.logits(hidden))
    assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_real_positions():
    ours = from_transformers(_theirs("t5-v1.0")).eval()
    src, mask, tgt = _batch()
    with torch.no_grad():
        alone = ours(src[2:, :5], tgt[2:], mask[2:, :5])
        batched = ours(src, tgt, mask)[2:]
    assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_reference_attention_equals_sdpa_and_shows_the_bias():
    """The explicit softmax(QK^T + bias) path gives SDPA's logits; its weights rows sum to 1."""
    ours = from_transformers(_theirs("t5-v1.1")).eval()
    src, mask, tgt = _batch()
    fused = _logits(ours, src, mask, tgt)
    attention = [m for m in ours.modules() if hasattr(m, "use_reference")]
    for m in attention:
        m.use_reference = True
    assert_close(_logits(ours, src, mask, tgt), fused, atol=1e-5, rtol=1e-5)
    w = ours.encoder.blocks[0].attn.last_weights  # (B, H, S, S)
    assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert (w[1, :, :-4, -4:] == 0).all()  # real tokens give padding no attention


def test_parameter_counts_equal_transformers():
    """Every T5 preset: the planner's exact count, the built model's and transformers' agree
    (and the published sizes: t5-small 60.5M, flan-t5-small 77.0M, mt5-small 300.2M)."""
    counts = {}
    for name in (n for n, (cls, _) in PRESETS.items() if cls is T5Config):
        c = preset(name)
        cfg, _ = to_hf(build_meta(c))
        with torch.device("meta"):
            theirs = hf.T5ForConditionalGeneration(hf.T5Config.from_dict(cfg))
            if not c.tie_embeddings:
                theirs.lm_head.weight = torch.nn.Parameter(torch.empty(c.vocab_size, c.dim))
            ours = build(c)
        counts[name] = theirs.num_parameters()
        assert arch_of(c).total_params == count_params(ours) == counts[name], name
    assert (counts["t5-small"], counts["flan-t5-small"], counts["mt5-small"]) == (60_506_624, 76_961_152,
                                                                                  300_176_768)


def build_meta(c: T5Config) -> T5:
    with torch.device("meta"):
        return build(c)


def test_bad_t5_configs_name_the_field():
    cfg = {**_theirs("t5-v1.0").config.to_dict(), "architectures": ["T5ForConditionalGeneration"]}
    with pytest.raises(ConversionError, match="feed_forward_proj 'gated-swish-x'"):
        from_hf({**cfg, "feed_forward_proj": "gated-swish-x"}, {})
    with pytest.raises(ConversionError, match="the field 'd_kv' is missing"):
        from_hf({k: v for k, v in cfg.items() if k != "d_kv"}, {})
    with pytest.raises(ValueError, match="T5Config.relative_buckets"):
        T5Config(relative_buckets=2)
    with pytest.raises(ValueError, match="T5Config.mlp"):
        T5Config(mlp="swiglu")


# ----------------------------------------------------------------------------- the tokenizer


def _t5_style_tokenizer(path) -> None:
    """A tiny Unigram tokenizer laid out as T5's tokenizer.json is: <pad> 0, </s> 1, <unk> 2,
    runs of spaces collapsed, words split on whitespace and marked by Metaspace (the pipeline
    transformers' T5 tokenizer class builds, whatever the file says), '$A </s>' post-processing,
    sentinels <extra_id_N> at the end."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = "the cat sat on mat dog ran a far".split()
    pieces += [(f"\u2581{w}", -2.0 - i * 0.1) for i, w in enumerate(words)]
    pieces += [(ch, -6.0) for ch in "\u2581abcdefghijklmnopqrstuvwxyz.,"]
    tok = HFTokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), metaspace])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(3)])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    hf.T5TokenizerFast(tokenizer_file=str(path / "tokenizer.json"), extra_ids=0,
                       additional_special_tokens=[f"<extra_id_{i}>" for i in range(3)]).save_pretrained(path)


def test_tokenizer_encodes_as_t5_tokenizer_fast(tmp_path):
    _t5_style_tokenizer(tmp_path / "tok")
    ours = Tokenizer.from_pretrained(tmp_path / "tok")
    theirs = hf.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert isinstance(theirs, hf.T5TokenizerFast)  # T5Tokenizer is the fast one in transformers 5
    assert (ours.eos_id, ours.pad_id, ours.unk_id, ours.bos_id) == (1, 0, 2, None)
    texts = ["the cat sat on the mat.", "a dog ran  far, far", "zebra <extra_id_0> the", ""]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids, text
        assert ids[-1] == ours.eos_id  # T5 appends </s>
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode_batch(texts[:2], texts[1:3]) == theirs(texts[:2], texts[1:3]).input_ids


def test_fixed_shape_decode_steps_give_the_eager_tokens():
    """The decode step a CUDA graph replays sees the whole preallocated cache (a (N, S_max) slot
    mask, the position bias over every slot): greedy and beam search give the eager tokens."""
    from lmforge.generate.decode import encdec_decode_step, generate

    ours = from_transformers(_theirs("t5-v1.1")).eval()
    src, mask, _ = _batch()
    for kw in (dict(), dict(num_beams=3)):
        eager = generate(ours, src, mask, max_new_tokens=10, **kw)
        static = generate(ours, src, mask, max_new_tokens=10, decode_step=encdec_decode_step, **kw)
        assert torch.equal(static.tokens, eager.tokens)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens():
    from lmforge.generate.decode import CompiledDecodeStep, encdec_decode_step, generate

    ours = from_transformers(_theirs("t5-v1.0")).eval()
    src, mask, _ = _batch()
    eager = generate(ours, src, mask, max_new_tokens=8)
    step = CompiledDecodeStep(encdec_decode_step, mode="default")  # fullgraph: no graph break in T5's step
    assert torch.equal(generate(ours, src, mask, max_new_tokens=8, decode_step=step).tokens, eager.tokens)
