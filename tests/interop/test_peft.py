"""PEFT adapters both ways: what lmforge writes, peft.PeftModel.from_pretrained loads onto the
transformers base with the same outputs; what peft saved, lmforge.load(base, adapter=) loads
with peft's outputs; adapters that do not fit the base are one line naming the tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import lmforge
from lmforge.interop.peft import load_adapter, save_adapter
from lmforge.models import HeadSpec, attach_head
from lmforge.nn.lora import LoRALinear, apply_lora

hf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
hf.logging.set_verbosity_error()

V = 96
IDS = torch.randint(3, V, (2, 11), generator=torch.Generator().manual_seed(1))


def _gpt2():
    return hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                            resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def _llama():  # grouped-query attention: q, k, v of different widths inside lmforge's wqkv
    return hf.LlamaForCausalLM(hf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, bos_token_id=1, eos_token_id=2))


def _bert_cfg(**kw):
    return hf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0,
                         attention_probs_dropout_prob=0, **kw)


def _bart():
    return hf.BartForConditionalGeneration(hf.BartConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None))


def _t5():
    model = hf.T5ForConditionalGeneration(hf.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, tie_word_embeddings=False))
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32) * 0.2)  # transformers 5 ties a fresh head
    return model


def _save_base(model, path):
    torch.manual_seed(0)
    model.eval().save_pretrained(path)
    return path


def _as_trained(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5)  # a trained adapter: B away from its zero init


def _outputs(model, kind):
    with torch.no_grad():
        if kind == "seq2seq":
            return model(IDS, IDS)
        return model(IDS)


def _theirs(model, kind):
    with torch.no_grad():
        out = model(input_ids=IDS, decoder_input_ids=IDS) if kind == "seq2seq" else model(input_ids=IDS)
    return out.logits


CASES = {  # name: (transformers model, lmforge targets, peft Auto class, kind)
    "gpt2": (_gpt2, ["wqkv", "wo", "up", "down"], "AutoModelForCausalLM", "lm"),
    "llama": (_llama, ["wqkv", "wo", "gate", "up", "down"], "AutoModelForCausalLM", "lm"),
    "bart": (_bart, ["wqkv", "wo", "wq", "wkv"], "AutoModelForSeq2SeqLM", "seq2seq"),
    "t5": (_t5, ["wqkv", "wo", "wq", "wkv", "gate", "up", "down"], "AutoModelForSeq2SeqLM", "seq2seq"),
}


@pytest.mark.parametrize("name", CASES)
def test_lmforge_adapter_loads_in_peft_with_the_same_outputs(name, tmp_path):
    make, targets, auto, kind = CASES[name]
    base = _save_base(make(), tmp_path / "base")
    lm = lmforge.load(base)
    apply_lora(lm.model, targets, rank=4, alpha=8)
    _as_trained(lm.model)
    ours = _outputs(lm.model.eval(), kind)
    out = save_adapter(lm.model, None, tmp_path / "adapter", base_model=str(base))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["fan_in_fan_out"] == (name == "gpt2")
    theirs = peft.PeftModel.from_pretrained(getattr(hf, auto).from_pretrained(base), out).eval()
    assert_close(ours[..., :V], _theirs(theirs, kind), atol=1e-4, rtol=1e-4)
    # and lmforge reads its own adapter back (the shared-A layout collapses to rank 4 again)
    again = lmforge.load(base, adapter=out)
    assert_close(_outputs(again.model, kind), ours, atol=1e-4, rtol=1e-4)


def test_classifier_adapter_carries_its_head(tmp_path):
    base = _save_base(hf.BertModel(_bert_cfg()), tmp_path / "base")  # an encoder, no heads
    lm = lmforge.load(base)
    head = HeadSpec("sequence-classification", ["a", "b", "c"], "pooler")
    model = attach_head(lm.model, head).eval()
    apply_lora(model.backbone, ["wqkv", "wo"], rank=2, alpha=4)
    _as_trained(model)
    ours = _outputs(model, "cls")
    out = save_adapter(model, head, tmp_path / "adapter", base_model=str(base))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    hf_base = hf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    theirs = peft.PeftModel.from_pretrained(hf_base, out).eval()
    assert_close(ours, _theirs(theirs, "cls"), atol=1e-4, rtol=1e-4)
    again = lmforge.load(base, adapter=out)  # the head comes from the adapter
    assert again.head.kind == "sequence-classification" and len(again.head.labels) == 3
    assert_close(_outputs(again.model, "cls"), ours, atol=1e-4, rtol=1e-4)


def _roberta_cfg(**kw):
    return hf.RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, hidden_dropout_prob=0,
                            attention_probs_dropout_prob=0, **kw)


def _distilbert_cfg(**kw):
    return hf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
                               dropout=0, attention_dropout=0, **kw)


@pytest.mark.parametrize("family, saved", [("roberta", ["classifier"]),
                                           ("distilbert", ["pre_classifier", "classifier"])])
def test_encoder_classifier_adapter_carries_its_two_layer_head(family, saved, tmp_path):
    """RoBERTa's head is classifier.dense + classifier.out_proj (one module to peft),
    DistilBERT's pre_classifier + classifier: both layers travel with the adapter."""
    make = (hf.RobertaModel, _roberta_cfg) if family == "roberta" else (hf.DistilBertModel, _distilbert_cfg)
    base = _save_base(make[0](make[1]()), tmp_path / "base")
    lm = lmforge.load(base)
    head = HeadSpec("sequence-classification", ["a", "b", "c"], "cls", hidden="tanh" if family == "roberta" else "relu")
    model = attach_head(lm.model, head).eval()
    apply_lora(model.backbone, ["wqkv", "wo"], rank=2, alpha=4)
    _as_trained(model)
    ours = _outputs(model, "cls")
    out = save_adapter(model, head, tmp_path / "adapter", base_model=str(base))
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == saved
    hf_base = hf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    theirs = peft.PeftModel.from_pretrained(hf_base, out).eval()
    assert_close(ours, _theirs(theirs, "cls"), atol=1e-4, rtol=1e-4)
    again = lmforge.load(base, adapter=out)
    assert again.head.hidden == head.hidden
    assert_close(_outputs(again.model, "cls"), ours, atol=1e-4, rtol=1e-4)


def test_peft_roberta_classifier_loads_with_its_whole_head(tmp_path):
    model = hf.RobertaForSequenceClassification(_roberta_cfg(num_labels=4))
    base = _save_base(model, tmp_path / "base")
    torch.manual_seed(5)
    theirs = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False,
                                                        target_modules=["query", "value"])).eval()
    with torch.no_grad():
        for p in theirs.base_model.model.classifier.modules_to_save["default"].parameters():
            p.normal_()  # a trained head: dense and out_proj
    theirs.save_pretrained(tmp_path / "adapter")
    lm = lmforge.load(base, adapter=tmp_path / "adapter")
    assert_close(_outputs(lm.model, "cls"), _theirs(theirs, "cls"), atol=1e-4, rtol=1e-4)


PEFT_CASES = {  # name: (transformers model, peft LoraConfig options)
    "llama-q-v": (_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj",
                                                                                          "down_proj"])),
    "gpt2-rslora": (_gpt2, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_rslora=True,
                                target_modules=["c_attn", "c_proj"], rank_pattern={"h.1.attn.c_attn": 2})),
    "bart-qkv": (_bart, dict(task_type="SEQ_2_SEQ_LM", r=2, target_modules=["q_proj", "k_proj", "v_proj", "fc1"])),
    "t5-qv-wi": (_t5, dict(task_type="SEQ_2_SEQ_LM", r=2, target_modules=["q", "v", "wi_0", "wo"])),
}


@pytest.mark.parametrize("name", PEFT_CASES)
def test_peft_adapter_loads_in_lmforge_with_peft_outputs(name, tmp_path):
    make, options = PEFT_CASES[name]
    model = make()
    base = _save_base(model, tmp_path / "base")
    torch.manual_seed(5)
    theirs = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **options)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    kind = "seq2seq" if name.startswith(("bart", "t5")) else "lm"
    lm = lmforge.load(base, adapter=tmp_path / "adapter")
    assert_close(_outputs(lm.model, kind)[..., :V], _theirs(theirs, kind), atol=1e-4, rtol=1e-4)
    unmerged, _ = load_adapter(lmforge.load(base).model, None, tmp_path / "adapter")  # kept apart: same outputs
    assert any(isinstance(m, LoRALinear) for m in unmerged.modules())
    assert_close(_outputs(unmerged.eval(), kind)[..., :V], _theirs(theirs, kind), atol=1e-4, rtol=1e-4)


def test_peft_classifier_with_separate_qkv_adapters(tmp_path):
    model = hf.BertForSequenceClassification(_bert_cfg(num_labels=4))
    base = _save_base(model, tmp_path / "base")
    torch.manual_seed(5)
    theirs = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False,
                                                        target_modules=["query", "key", "value"])).eval()
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.normal_()  # a trained head
    theirs.save_pretrained(tmp_path / "adapter")
    lm = lmforge.load(base, adapter=tmp_path / "adapter")
    assert_close(_outputs(lm.model, "cls"), _theirs(theirs, "cls"), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- adapters that do not fit


@pytest.fixture
def gpt2_adapter(tmp_path):
    model = _gpt2()
    base = _save_base(model, tmp_path / "base")
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter"


def _edit(adapter, config=None, rename=None, reshape=None):
    if config:
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    tensors = load_file(adapter / "adapter_model.safetensors")
    if rename:
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
    if reshape:
        tensors = {k: (v[:, :reshape] if k.endswith("lora_B.weight") else v[:reshape]).contiguous()
                   for k, v in tensors.items()}
    save_file(tensors, adapter / "adapter_model.safetensors")


@pytest.mark.parametrize("edit, message", [
    (dict(config={"r": 8}), r"tensor base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight has shape "
                            r"\(4, 32\), the model's blocks\.0\.attn\.wqkv with r=8 needs \(8, 32\)"),
    (dict(reshape=2), r"tensor base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight has shape \(2, "),
    (dict(rename=("c_attn", "q_proj")), r"tensor base_model\.model\.transformer\.h\.0\.attn\.q_proj\.lora_A\.weight "
                                        r"adapts a module the gpt2 model does not have \(its linear layers: c_attn"),
    (dict(config={"use_dora": True}), r"adapter_config\.json: use_dora=True is not supported"),
], ids=["rank", "shape", "target", "dora"])
def test_an_adapter_that_does_not_fit_names_the_tensor(gpt2_adapter, edit, message):
    base, adapter = gpt2_adapter
    _edit(adapter, **edit)
    with pytest.raises(ValueError, match=message):
        lmforge.load(base, adapter=adapter)


def test_an_adapter_of_another_base_is_refused(gpt2_adapter, tmp_path):
    _, adapter = gpt2_adapter
    wider = _save_base(hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=V, n_positions=64, n_embd=48, n_layer=2,
                                                        n_head=2)), tmp_path / "wider")
    with pytest.raises(ValueError, match=r"c_attn\.lora_A\.weight has shape \(4, 32\), .* needs \(4, 48\)"):
        lmforge.load(wider, adapter=adapter)


def test_cli_adapter_errors_are_one_line(gpt2_adapter, capsys):
    from lmforge.cli import main

    base, adapter = gpt2_adapter
    _edit(adapter, config={"r": 8})
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(base), "--adapter", str(adapter), "--prompt", "x", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora_A.weight has shape (4, 32)" in err[0]
