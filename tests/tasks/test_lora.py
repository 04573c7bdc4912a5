"""LoRA: the wrapped model starts identical, merging is exact, only adapters and the head
train, and the merged export loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as hf
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

import lmforge
from lmforge.interop.model_dir import load_model_dir
from lmforge.models import BertConfig, GPTConfig, build
from lmforge.nn.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora
from lmforge.tasks import driver, finetune


def _gpt():
    torch.manual_seed(0)
    return build(GPTConfig(vocab_size=64, max_seq_len=16, dim=32, n_layers=2, n_heads=2)).eval()


def test_wrapped_model_starts_identical_and_merge_is_exact():
    model = _gpt()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = model(ids)
    wrapped = apply_lora(model, ["wqkv", "wo", "down"], rank=4, alpha=8)
    assert wrapped == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.wo", "attn.wqkv", "mlp.down")]
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # B = 0: the update starts at exactly zero
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_()  # as if trained
        adapted = model(ids)
    assert (adapted - before).abs().max() > 1e-2
    assert set(lora_state_dict(model)) == {f"{n}.{p}" for n in wrapped for p in ("lora_A", "lora_B")}
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in wrapped)
    with torch.no_grad():
        assert_close(model(ids), adapted, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(_gpt().state_dict())  # plain names again


def test_merge_equals_the_formula_in_float64():
    base = nn.Linear(6, 5).double()
    layer = LoRALinear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = x @ base.weight.T + base.bias + 1.5 * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert_close(layer(x), expected, atol=1e-12, rtol=0)
    assert_close(layer.merged_weight(), base.weight + 1.5 * layer.lora_B @ layer.lora_A, atol=1e-12, rtol=0)


def test_bad_targets_and_rank():
    with pytest.raises(ValueError, match="no linear layer named 'wq'.*available: down, lm_head, up, wo, wqkv"):
        apply_lora(_gpt(), ["wq"], rank=2, alpha=4)
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        apply_lora(_gpt(), ["wo"], rank=0, alpha=4)


def test_finetune_trains_only_adapters_and_head_and_exports_merged(ag_news, make_model, fast, tmp_path, monkeypatch):
    base = make_model(tmp_path / "base", ag_news["texts"])
    start = load_file(base / "model.safetensors")
    out = tmp_path / "run"
    seen = {}
    original = driver.apply_training_scope

    def scope(model, head, config):  # record which parameters will train
        line = original(model, head, config)
        seen.update({n: p.requires_grad for n, p in model.named_parameters()})
        return line

    monkeypatch.setattr(driver, "apply_training_scope", scope)
    finetune("classify", base, ag_news["train"], ag_news["valid"], out, epochs=1, lr=5e-3, max_length=48,
             lora_rank=4, lora_alpha=8, lora_targets="wqkv,wo", **fast)
    trainable = sorted(n for n, t in seen.items() if t)
    assert trainable == sorted([f"backbone.blocks.{i}.attn.{m}.lora_{p}" for i in range(2) for m in ("wqkv", "wo")
                                for p in "AB"] + ["head.weight", "head.bias"])
    # Exported: adapters merged into wqkv/wo (changed), everything else not trained is bit-identical.
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    end = load_file(out / "model" / "model.safetensors")
    assert not any("lora" in k for k in end)
    changed = sorted(k for k in start if k in end and not torch.equal(start[k], end[k]))
    assert changed == sorted(f"bert.encoder.layer.{i}.attention.{m}.{p}" for i in range(2)
                             for m in ("self.query", "self.key", "self.value", "output.dense") for p in ["weight"])
    ours, _, tok, _ = load_model_dir(out / "model")
    theirs = hf.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    ids = torch.tensor([tok.encode("Shares of the company rose after the report.")])
    with torch.no_grad():
        want = ours.eval()(ids)
        assert_close(want, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    # out/adapter: the same model as a PEFT adapter (LoRA tensors + the head) of the starting model.
    peft = pytest.importorskip("peft")
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base) and adapter["r"] == 4
    assert (out / "adapter" / "tokenizer.json").is_file()
    start_model = hf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(config["id2label"]))
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(start_model, out / "adapter").eval()(input_ids=ids).logits
    assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_bert_lora_on_mlp(make_model):
    torch.manual_seed(0)
    model = build(BertConfig(vocab_size=64, max_seq_len=16, dim=32, n_layers=2, n_heads=2))
    assert apply_lora(model, ["up"], rank=2, alpha=2) == ["blocks.0.mlp.up", "blocks.1.mlp.up"]


def test_merge_lora_false_writes_only_the_adapter(ag_news, make_model, fast, tmp_path):
    base = make_model(tmp_path / "base", ag_news["texts"])
    out = tmp_path / "run"
    metrics = finetune("classify", base, ag_news["train"], ag_news["valid"], out, epochs=1, lr=5e-3, max_length=32,
                       lora_rank=2, merge_lora=False, **fast)
    assert metrics["run"]["model_format"] == "adapter"
    assert not (out / "model").exists() and (out / "adapter" / "adapter_model.safetensors").is_file()
    lm = lmforge.load(base, adapter=out / "adapter")  # the head comes with the adapter
    assert lm.head.kind == "sequence-classification" and len(lm.head.labels) == 4
