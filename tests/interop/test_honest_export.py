"""Honest exports: a tensor that was neither loaded nor trained is not written as if it were,
and the exported `architectures` names the class whose tensors are real
(lmforge.models.provenance). transformers reads what lmforge wrote and says what is new."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.models.provenance import untrained
from lmforge.pretrain import UNTRAINED_BY_OBJECTIVE
from lmforge.tasks.base import FinetuneConfig
from lmforge.tasks.driver import apply_training_scope

hf = pytest.importorskip("transformers")
hf.logging.set_verbosity_error()

V = 96


def _bert_cfg():
    return hf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)


def _llama_cfg():
    return hf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def _saved(model, path):
    torch.manual_seed(0)
    model.save_pretrained(path)
    return path


def _arch(path):
    return json.loads((path / "config.json").read_text())["architectures"]


def test_bert_encoder_without_heads_exports_as_bert_model(tmp_path):
    src = _saved(hf.BertModel(_bert_cfg()).eval(), tmp_path / "encoder")
    lm = lmforge.load(src)
    assert {"lm_head.dense.weight", "nsp_head.weight"} <= untrained(lm.model)
    out = lm.save(tmp_path / "out", format="hf")
    assert _arch(out) == ["BertModel"]
    assert not [n for n in load_file(out / "model.safetensors") if n.startswith(("cls.", "lm_head"))]
    ids = torch.randint(0, V, (2, 9))
    want = hf.BertModel.from_pretrained(src).eval()(ids).last_hidden_state
    assert torch.allclose(hf.AutoModel.from_pretrained(out).eval()(ids).last_hidden_state, want, atol=1e-5)
    # A masked-LM class built from it reports its head as new instead of predicting from noise silently.
    _, info = hf.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert any(k.startswith("cls.predictions") for k in info["missing_keys"])


def test_the_record_survives_lmforge_format(tmp_path):
    src = _saved(hf.BertModel(_bert_cfg()), tmp_path / "encoder")
    mid = lmforge.load(src).save(tmp_path / "mid")  # lmforge's own format
    assert "nsp_head.weight" in json.loads((mid / "config.json").read_text())["untrained"]
    assert _arch(lmforge.load(mid).save(tmp_path / "out", format="hf")) == ["BertModel"]


def test_masked_lm_checkpoint_keeps_its_head_and_drops_the_random_nsp(tmp_path):
    src = _saved(hf.BertForMaskedLM(_bert_cfg()).eval(), tmp_path / "mlm")
    out = lmforge.load(src).save(tmp_path / "out", format="hf")
    assert _arch(out) == ["BertForMaskedLM"]
    names = set(load_file(out / "model.safetensors"))
    assert "cls.predictions.transform.dense.weight" in names and not any("seq_relationship" in n for n in names)
    ids = torch.randint(0, V, (2, 9))
    theirs, info = hf.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    want = hf.BertForMaskedLM.from_pretrained(src).eval()(ids).logits
    assert torch.allclose(theirs.eval()(ids).logits, want, atol=1e-5)


def test_mlm_pretraining_exports_no_nsp_head(tmp_path, bert):
    from lmforge.models.provenance import set_untrained

    model = bert()
    set_untrained(model, UNTRAINED_BY_OBJECTIVE["mlm"])
    out = lmforge.LM(model).save(tmp_path / "out", format="hf")
    assert _arch(out) == ["BertForMaskedLM"]
    _, info = hf.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_llama_backbone_without_lm_head_exports_as_llama_model(tmp_path):
    src = _saved(hf.LlamaModel(_llama_cfg()).eval(), tmp_path / "base")
    lm = lmforge.load(src)  # an untied LM head the checkpoint lacks: new, and recorded so
    assert untrained(lm.model) == {"lm_head.weight"}
    out = lm.save(tmp_path / "out", format="hf")
    assert _arch(out) == ["LlamaModel"] and "lm_head.weight" not in load_file(out / "model.safetensors")
    _, info = hf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert set(info["missing_keys"]) == {"lm_head.weight"}


def test_training_the_head_makes_it_real(tmp_path):
    src = _saved(hf.LlamaModel(_llama_cfg()), tmp_path / "base")
    lm = lmforge.load(src)
    apply_training_scope(lm.model, None, FinetuneConfig())  # sft / seq2seq: everything trains
    assert not untrained(lm.model)
    assert _arch(lm.save(tmp_path / "out", format="hf")) == ["LlamaForCausalLM"]


def test_lora_or_a_task_head_leaves_pretraining_heads_untrained(tmp_path):
    src = _saved(hf.BertModel(_bert_cfg()), tmp_path / "encoder")
    lm = lmforge.load(src)
    apply_training_scope(lm.model, None, FinetuneConfig(lora_rank=2))
    assert "lm_head.dense.weight" in untrained(lm.model)


def test_bart_model_exports_without_a_made_up_logits_bias(tmp_path):
    cfg = hf.BartConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=64)
    src = _saved(hf.BartModel(cfg), tmp_path / "bart")
    out = lmforge.load(src).save(tmp_path / "out", format="hf")
    assert _arch(out) == ["BartForConditionalGeneration"]
    assert "final_logits_bias" not in load_file(out / "model.safetensors")
    ids = torch.randint(3, V, (2, 7))
    theirs = hf.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    ours = lmforge.load(out).model.eval()
    with torch.no_grad():
        assert torch.allclose(ours(ids, ids), theirs(input_ids=ids, decoder_input_ids=ids).logits, atol=1e-4)
