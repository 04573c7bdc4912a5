"""Checkpoint formats as transformers writes them: sharded safetensors with an index,
bf16/fp16 weights kept in their dtype, tensors a checkpoint lacks initialised as the model
would; and the bad input around them (a missing shard, an index naming a tensor its shard
lacks) as one line."""

import json

import pytest
import torch
import transformers as hf
from torch.testing import assert_close

import lmforge
from lmforge.cli import main
from lmforge.interop.convert import ConversionError
from lmforge.models.weights import init_only, parse_size

V = 97


def _llama(**kw):
    cfg = hf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    return hf.LlamaForCausalLM(cfg).eval()


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def test_sharded_checkpoints_both_ways(tmp_path):
    theirs = _llama()
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    ids = torch.randint(0, V, (2, 9))
    lm = lmforge.load(tmp_path / "hf")
    assert_close(_logits(lm.model, ids), _logits(theirs, ids), atol=1e-5, rtol=1e-5)

    lm.save(tmp_path / "out", format="hf", max_shard_size="20KB")
    written = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(written["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "out" / s).is_file() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "out" / "model.safetensors").exists()
    again = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_close(_logits(again, ids), _logits(theirs, ids), atol=1e-5, rtol=1e-5)
    lm.save(tmp_path / "one", format="hf")  # below the default 5GB: one file
    assert (tmp_path / "one" / "model.safetensors").is_file()
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()


def test_a_missing_shard_or_a_lying_index_is_one_line(tmp_path, capsys):
    _llama().save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index_file = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))

    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]  # the index says shard 2 holds a tensor of shard 1
    index_file.write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=f"names tensor {name} in {shards[1]}, which does not hold it"):
        lmforge.load(tmp_path / "hf")

    (tmp_path / "hf" / shards[-1]).unlink()
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "hf"), "--prompt", "x", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bar above
    assert e.value.code == 2 and err == f"lmforge: error: {index_file}: shard {shards[-1]} is missing"


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float16])
def test_dtype_on_load(tmp_path, saved):
    theirs = _llama().to(saved)
    theirs.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, V, (2, 9))
    auto = lmforge.load(tmp_path / "hf", dtype="auto")
    assert {p.dtype for p in auto.model.parameters()} == {saved}
    assert_close(_logits(auto.model, ids), _logits(theirs, ids), atol=2e-2, rtol=2e-2)
    assert {p.dtype for p in lmforge.load(tmp_path / "hf").model.parameters()} == {torch.float32}
    # The values themselves are the checkpoint's, whatever the dtype asked for.
    wide = lmforge.load(tmp_path / "hf", dtype="float32")
    assert torch.equal(wide.model.tok_emb.weight[:V].to(saved), theirs.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="dtype: expected auto, float32, bfloat16, float16, got 'int8'"):
        lmforge.load(tmp_path / "hf", dtype="int8")


def test_dtype_option_on_the_command_line(tmp_path, capsys):
    _llama().to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    main(["convert", str(tmp_path / "hf"), str(tmp_path / "lmf"), "--to", "lmforge"])
    capsys.readouterr()
    kept = lmforge.load(tmp_path / "lmf", dtype="auto")  # lmforge's format keeps the dtype too
    assert kept.model.tok_emb.weight.dtype == torch.float32  # convert loaded in float32 and wrote that
    lm = lmforge.load(tmp_path / "hf", dtype="bfloat16")
    lm.save(tmp_path / "lmf16")
    assert lmforge.load(tmp_path / "lmf16", dtype="auto").model.tok_emb.weight.dtype == torch.bfloat16


def test_tensors_a_checkpoint_lacks_get_the_models_own_initialisation(tmp_path):
    cfg = hf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    hf.BertModel(cfg).save_pretrained(tmp_path / "encoder")  # no pretraining heads
    model = lmforge.load(tmp_path / "encoder").model
    dense, nsp, norm = model.lm_head.dense, model.nsp_head, model.lm_head.norm
    for layer in (dense, nsp):
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.3) and torch.all(layer.bias == 0)
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()


def test_init_only_skips_random_values_but_not_computed_ones():
    from lmforge.models import build, preset

    with init_only():
        model = build(preset("llama-tiny", vocab_size=V))
    fresh = build(preset("llama-tiny", vocab_size=V))
    assert torch.equal(model.rope.cos, fresh.rope.cos)  # computed, not drawn
    assert torch.equal(model.norm_f.weight, fresh.norm_f.weight)  # ones
    assert torch.nn.init.normal_(torch.zeros(3), 0, 1).abs().sum() > 0  # restored on exit


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234 and parse_size("20KB") == 20000
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def _word_tokenizer(path, n):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(path / "tokenizer.json"))


def test_a_tokenizer_of_another_model_is_one_line(tmp_path, capsys):
    _llama().save_pretrained(tmp_path / "hf")
    _word_tokenizer(tmp_path / "hf", V - 10)  # fewer ids than rows: a padded table, fine
    assert lmforge.load(tmp_path / "hf").tokenizer.vocab_size == V - 10
    _word_tokenizer(tmp_path / "hf", V + 50)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "hf"), "--prompt", "w1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bar above
    assert e.value.code == 2 and err.startswith("lmforge: error: ")
    assert "tokenizer (tokenizer.json) has 147 ids but the model's vocabulary has 97 rows" in err
