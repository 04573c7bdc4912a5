"""generation_config.json as transformers writes and reads it: several end ids (an
instruct model's end of text and end of turn) stop lmforge's generation as they stop
transformers'; its default sampling settings apply unless the caller sets others; lmforge
writes the file back, and transformers reads it."""

import json

import pytest
import torch
import transformers as hf
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers

import lmforge
from lmforge.api import sampling_defaults

V = 64


def _llama_dir(tmp_path, **generation):
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2)
    model = hf.LlamaForCausalLM(cfg).eval()
    model.generation_config = hf.GenerationConfig(bos_token_id=1, **generation)
    model.save_pretrained(tmp_path / "hf")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, V)}}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>").save_pretrained(tmp_path / "hf")
    return model


def test_several_end_ids_stop_generation_as_in_transformers(tmp_path):
    free = _llama_dir(tmp_path)
    prompt = torch.tensor([lmforge.load(tmp_path / "hf").tokenizer.encode("t5 t9 t11")])
    P = prompt.size(1)
    tokens = free.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, P:]
    end = int(tokens[4])  # a token the model emits fifth: call it "end of turn"
    assert end != 2
    model = _llama_dir(tmp_path, eos_token_id=[2, end], pad_token_id=0)
    lm = lmforge.load(tmp_path / "hf")
    assert lm.tokenizer.eos_ids == [2, end]
    ours = lm.generate("t5 t9 t11", max_new_tokens=12)[0]
    theirs = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, P:]
    assert theirs[-1].item() == end and len(theirs) <= 5
    assert ours == lm.tokenizer.decode(theirs[:-1].tolist(), skip_special_tokens=True)
    pieces = "".join(lm.stream("t5 t9 t11", max_new_tokens=12))
    assert pieces == ours

    lm.save(tmp_path / "out", format="hf")
    written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert written["eos_token_id"] == [2, end] and written["pad_token_id"] == 0
    assert hf.GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [2, end]
    assert lmforge.load(tmp_path / "out").tokenizer.eos_ids == [2, end]


def test_default_sampling_settings_apply_unless_the_caller_sets_others(tmp_path):
    _llama_dir(tmp_path, do_sample=True, temperature=0.7, top_p=0.9, top_k=20)
    lm = lmforge.load(tmp_path / "hf")
    assert lm.generation["do_sample"] is True
    assert lm._options({}) == {"temperature": 0.7, "top_k": 20, "top_p": 0.9}
    assert lm._options({"temperature": 0}) == {"temperature": 0}
    assert "temperature" not in lm._options({"num_beams": 3})
    a = lm.generate("t5 t9", max_new_tokens=8, seed=0)[0]
    b = lm.generate("t5 t9", max_new_tokens=8, seed=0)[0]
    assert a == b  # sampling, reproducibly with a seed
    greedy = lm.generate("t5 t9", max_new_tokens=8, temperature=0)[0]
    samples = {lm.generate("t5 t9", max_new_tokens=8, seed=s)[0] for s in range(6)}
    assert len(samples) > 1 and greedy  # the defaults really sample
    lm.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["temperature"] == 0.7


def test_sampling_defaults_read_as_transformers_does():
    assert sampling_defaults({}) == {}
    assert sampling_defaults({"temperature": 0.6}) == {}  # no do_sample: greedy, as transformers
    assert sampling_defaults({"do_sample": True}) == {"temperature": 1.0, "top_k": 50}
    assert sampling_defaults({"do_sample": True, "top_k": 0, "top_p": 1.0}) == {"temperature": 1.0, "top_k": None}
    assert sampling_defaults({"repetition_penalty": 1.2}) == {"repetition_penalty": 1.2}


def test_a_bad_generation_config_is_one_line(tmp_path):
    _llama_dir(tmp_path)
    (tmp_path / "hf" / "generation_config.json").write_text('{"eos_token_id": "two"}')
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be an id or a list of ids"):
        lmforge.load(tmp_path / "hf")


def test_encoders_get_no_generation_config(tmp_path):
    from lmforge.models import build, preset

    lm = lmforge.api.LM(build(preset("bert-tiny", vocab_size=V)))
    lm.save(tmp_path / "bert", format="hf")
    assert not (tmp_path / "bert" / "generation_config.json").exists()
