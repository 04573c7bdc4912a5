"""lmforge.load / LM.save / lmforge convert: both formats, both directions, and bad input."""

import pickle
import subprocess
import sys

import pytest
import torch
import transformers as hf
from torch.testing import assert_close

import lmforge.api as api
from lmforge.models import build, preset
from lmforge.tokenizer import train_tokenizer

TEXT = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine", "to be or not to be"] * 30


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(texts=TEXT, kind="bpe", vocab_size=300)


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer(texts=TEXT, kind="wordpiece", vocab_size=200)


def _models(bpe, wordpiece):
    torch.manual_seed(0)
    small = dict(dim=32, n_heads=4, max_seq_len=64)
    return {
        "gpt2": (build(preset("gpt-tiny", vocab_size=bpe.vocab_size, n_layers=2, **small)), bpe),
        "llama": (build(preset("llama-tiny", vocab_size=bpe.vocab_size, n_layers=2, hidden_dim=64, **small)), bpe),
        "bert": (build(preset("bert-tiny", vocab_size=wordpiece.vocab_size, **small)), wordpiece),
        "bart": (build(preset("bart-tiny", vocab_size=bpe.vocab_size, **small)), bpe),
    }


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, ids[:, :5]) if hasattr(model, "decoder") else model(ids)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "bart"])
def test_lmforge_format_round_trip(tmp_path, bpe, wordpiece, kind):
    model, tok = _models(bpe, wordpiece)[kind]
    api.LM(model.eval(), tok).save(tmp_path / "m")
    lm = api.load(tmp_path / "m")
    ids = torch.tensor([tok.encode("the lazy dog saves nine")])
    assert_close(_logits(lm.model, ids), _logits(model, ids), atol=0, rtol=0)
    assert lm.tokenizer.encode("to be or not") == tok.encode("to be or not")


AUTO = {"gpt2": hf.AutoModelForCausalLM, "llama": hf.AutoModelForCausalLM, "bert": hf.AutoModelForMaskedLM,
        "bart": hf.AutoModelForSeq2SeqLM}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "bart"])
def test_hf_format_loads_in_transformers_with_identical_outputs(tmp_path, bpe, wordpiece, kind):
    model, tok = _models(bpe, wordpiece)[kind]
    api.LM(model.eval(), tok).save(tmp_path / "hf", format="hf")
    theirs = AUTO[kind].from_pretrained(tmp_path / "hf").eval()
    their_tok = hf.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the quick dog jumps"
    ids = torch.tensor([tok.encode(text)])
    assert their_tok(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        if kind == "bart":
            want = theirs(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        else:
            want = theirs(ids).logits
    assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)
    # and back: lmforge.load reads the directory it wrote, tensor for tensor
    again = api.load(tmp_path / "hf")
    assert_close(_logits(again.model, ids), want, atol=1e-5, rtol=1e-5)


def test_loads_a_directory_written_by_transformers(tmp_path):
    cfg = hf.GPT2Config(vocab_size=120, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    theirs = hf.GPT2LMHeadModel(cfg).eval()
    theirs.save_pretrained(tmp_path / "gpt2")
    lm = api.load(tmp_path / "gpt2")
    assert lm.tokenizer is None and lm.family == "gpt" and lm.special["eos_token_id"] == cfg.eos_token_id
    ids = torch.randint(0, 120, (2, 9))
    with torch.no_grad():
        assert_close(lm.model(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_plain_bert_reports_fresh_heads(tmp_path, caplog):
    hf.BertModel(hf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with caplog.at_level("WARNING"):
        lm = api.load(tmp_path / "bert")
    assert "freshly initialised" in caplog.text and "nsp_head.weight" in caplog.text
    assert lm.family == "bert"


def test_bin_weights_are_read_without_running_pickled_code(tmp_path):
    cfg = hf.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = hf.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "ok" / "pytorch_model.bin")  # the older format
    lm = api.load(tmp_path / "ok")  # a plain tensor dict loads
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        assert_close(lm.model(ids), model.eval()(ids).logits, atol=1e-5, rtol=1e-5)

    class Evil:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    bad = tmp_path / "evil"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with open(bad / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(ValueError, match="weights-only"):
        api.load(bad)
    assert not (tmp_path / "PWNED").exists()


def test_corrupt_and_truncated_weights_are_named(tmp_path, bpe, wordpiece):
    model, tok = _models(bpe, wordpiece)["gpt2"]
    for fmt in ("lmforge", "hf"):
        path = api.LM(model, tok).save(tmp_path / fmt, format=fmt)
        weights = path / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="model.safetensors"):
            api.load(path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        api.load(tmp_path / "nothing")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "gptj"}')
    (tmp_path / "odd" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="gptj"):
        api.load(tmp_path / "odd")


def test_save_is_atomic_and_keeps_the_old_directory_on_failure(tmp_path, bpe, wordpiece, monkeypatch):
    model, tok = _models(bpe, wordpiece)["gpt2"]
    path = api.LM(model, tok).save(tmp_path / "m")
    before = sorted(p.name for p in path.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("lmforge.interop.model_dir.save_weights", boom)
    with pytest.raises(OSError):
        api.LM(model, tok).save(path)
    assert sorted(p.name for p in path.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind
    api.load(path)


def test_cli_convert_both_ways_and_bad_input(tmp_path, bpe, wordpiece):
    model, tok = _models(bpe, wordpiece)["bart"]
    api.LM(model.eval(), tok).save(tmp_path / "lmf")
    run = lambda *args: subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True)
    r = run("convert", str(tmp_path / "lmf"), str(tmp_path / "hf"), "--to", "hf")
    assert r.returncode == 0, r.stderr
    r = run("convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "lmforge")
    assert r.returncode == 0, r.stderr
    ids = torch.tensor([tok.encode("a stitch in time")])
    assert_close(_logits(api.load(tmp_path / "back").model, ids), _logits(model, ids), atol=1e-6, rtol=1e-6)
    r = run("convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "hf")
    assert r.returncode == 2 and "no config.json" in r.stderr and "Traceback" not in r.stderr


# ---- dtype and quantize on load ----------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory, bpe):
    """One small Llama saved four ways: fp32 and bf16, each in both formats."""
    torch.manual_seed(0)
    model = build(preset("llama-tiny", vocab_size=bpe.vocab_size, n_layers=2, dim=32, n_heads=4, hidden_dim=64,
                         max_seq_len=64)).eval()
    root = tmp_path_factory.mktemp("dtypes")
    dirs = {}
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in ("hf", "lmforge"):
            m = build(model.config).eval()
            m.load_state_dict(model.state_dict())
            dirs[str(dtype).removeprefix("torch."), fmt] = api.LM(m.to(dtype), bpe).save(root / f"{dtype}-{fmt}",
                                                                                      format=fmt)
    return model, dirs


@pytest.mark.parametrize("fmt", ["hf", "lmforge"])
def test_dtype_auto_keeps_the_checkpoints_own(llama_dirs, fmt):
    _, dirs = llama_dirs
    assert api.load(dirs["bfloat16", fmt], dtype="auto").model.lm_head.weight.dtype == torch.bfloat16
    assert api.load(dirs["float32", fmt], dtype="auto").model.lm_head.weight.dtype == torch.float32
    assert api.load(dirs["bfloat16", fmt]).model.lm_head.weight.dtype == torch.float32  # None: fp32, as before
    lm = api.load(dirs["float32", fmt], dtype="bfloat16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.model.make_cache(1, 4)[0].k.dtype == torch.bfloat16  # the KV cache in the compute dtype
    assert isinstance(lm.generate("the lazy dog", max_new_tokens=4)[0], str)


def test_quantize_on_load_generates_and_refuses_to_save(llama_dirs, tmp_path):
    model, dirs = llama_dirs
    lm = api.load(dirs["float32", "hf"], quantize="int8")
    ids = torch.tensor([lm.tokenizer.encode("the lazy dog saves nine")])
    with torch.no_grad():
        ref, got = model(ids), lm.model(ids)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()  # weight-only int8: close, not equal
    assert len(lm.generate(["to be", "a stitch in"], max_new_tokens=4)) == 2
    with pytest.raises(ValueError, match="quantised"):
        lm.save(tmp_path / "q")
    with pytest.raises(ValueError, match="quantize: unknown 'int2'"):
        api.load(dirs["float32", "hf"], quantize="int2")
    with pytest.raises(ValueError, match="dtype: expected auto.*'float8'"):
        api.load(dirs["float32", "hf"], dtype="float8")
    assert api.load(dirs["bfloat16", "hf"], dtype="auto", quantize="int8").model.make_cache(1, 4)[0].k.dtype \
        == torch.bfloat16
