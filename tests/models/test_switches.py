"""The GPT's training-idea switches (GPTConfig fields): ReLU^2 MLP, QK-norm, an untied head,
logit soft-capping, zero-initialised output projections, value embeddings. Each: its shapes,
what it does, its trip through a pretraining config to a saved model directory and back, and
its export: transformers loads it with equal logits, or the export refuses naming the field."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from torch.testing import assert_close

import lmforge
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.interop.hf import ConversionError, model_type_of
from lmforge.interop.model_dir import save_model_dir
from lmforge.models import GPTConfig, build, count_params, preset
from lmforge.models.arch import arch_of
from lmforge.models.gpt import soft_cap
from lmforge.nn.mlp import MLP
from lmforge.pretrain import pretrain
from lmforge.train.objectives import linear_cross_entropy

V = 64
SMALL = dict(vocab_size=V, max_seq_len=32, dim=32, n_layers=4, n_heads=2)


def _gpt(**kw) -> torch.nn.Module:
    torch.manual_seed(kw.pop("seed", 0))
    return build(GPTConfig(**{**SMALL, **kw})).eval()


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor away from its init (zeros, ones, 0.5), so that an export really maps each."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _hf_logits_equal(model, tmp_path, model_type: str):
    save_model_dir(tmp_path / "hf", model, format="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == model_type
    theirs = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        assert_close(theirs(ids).logits, model(ids), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- ReLU^2


def test_relu2_mlp_is_the_squared_relu(tmp_path):
    mlp = MLP(8, 16, act="relu2", bias=True)
    x = torch.randn(2, 3, 8)
    y = mlp(x)
    assert y.shape == (2, 3, 8)
    assert_close(y, mlp.down(F.relu(mlp.up(x)) ** 2))
    model = _perturb(_gpt(act="relu2"))
    _hf_logits_equal(model, tmp_path, "gpt2")  # GPT-2's activation_function "relu2"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "relu2"
    assert lmforge.load(tmp_path / "hf").model.config.act == "relu2"


# ----------------------------------------------------------------------------- QK-norm


def test_qk_norm_normalises_each_heads_queries_and_keys():
    model = _gpt(qk_norm=True)
    attn = model.blocks[0].attn
    seen = {}
    for name, norm in (("q", attn.q_norm), ("k", attn.k_norm)):
        norm.register_forward_hook(lambda m, i, o, name=name: seen.update({name: (i[0], o)}) and None)
    model(torch.randint(0, V, (2, 10)))
    for name in "qk":
        projected, out = seen[name]
        assert out.shape == (2, 2, 10, 16)  # (B, H, T, Dh)
        eps = model.config.norm_eps
        assert_close(out, projected / (projected.pow(2).mean(-1, keepdim=True) + eps).sqrt())  # gains are 1
        assert_close(out.pow(2).mean(-1), torch.ones(2, 2, 10), atol=1e-2, rtol=0)  # unit RMS per head


def test_qk_norm_exports_as_qwen3_on_llamas_layout_and_refuses_on_gpt2s(tmp_path, capsys):
    llama = _perturb(build(preset("llama-tiny", vocab_size=V, n_layers=2, qk_norm=True, tie_embeddings=False)).eval())
    _hf_logits_equal(llama, tmp_path / "qwen3", "qwen3")
    gpt2_layout = _gpt(qk_norm=True)
    with pytest.raises(ConversionError, match="qk_norm=true on a GPT-2-style layout"):
        model_type_of(gpt2_layout.config)
    _refused_by_convert(gpt2_layout, tmp_path, capsys, "qk_norm")


def _refused_by_convert(model, tmp_path, capsys, field: str):
    """`lmforge convert --to hf` of the model's lmforge directory: one line naming the field, exit 2."""
    save_model_dir(tmp_path / "lmf", model, format="lmforge")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "lmf"), str(tmp_path / "out"), "--to", "hf"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and field in err and "transformers has no model type" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------- untied head


def test_untied_head_is_its_own_matrix_and_exports(tmp_path):
    model = _gpt(tie_embeddings=False)
    assert model.lm_head.weight is not model.tok_emb.weight
    assert count_params(model) == count_params(_gpt()) + model.lm_head.weight.numel()
    _hf_logits_equal(_perturb(model), tmp_path, "gpt2")


# ----------------------------------------------------------------------------- logit soft-capping


def test_soft_capping_bounds_the_logits(tmp_path, capsys):
    model = _gpt(logit_softcap=5.0, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)  # raw logits in the hundreds
    ids = torch.randint(0, V, (2, 10))
    logits = model(ids)
    raw = model.lm_head(model.encode(ids))[..., :V]
    assert logits.shape == (2, 10, V) and raw.abs().max() > 50
    assert logits.abs().max() <= 5.0  # (tanh rounds to 1 in fp32 far out)
    assert_close(logits, 5.0 * torch.tanh(raw / 5.0))
    small = torch.linspace(-0.1, 0.1, 11)
    assert_close(soft_cap(small, 30.0), small, atol=1e-5, rtol=0)  # about the identity near 0
    _refused_by_convert(model, tmp_path, capsys, "logit_softcap")


def test_chunked_cross_entropy_of_soft_capped_logits_equals_autograd():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = (torch.randn(V + 4, 16) * 3).requires_grad_()  # padded rows, big logits
    labels = torch.randint(0, V, (37,))
    labels[::5] = -100
    loss = linear_cross_entropy(hidden, weight, labels, V, chunk_rows=8, softcap=4.0)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    ref = F.cross_entropy(soft_cap(hidden @ weight[:V].t(), 4.0), labels, reduction="sum")
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert_close(loss, ref)
    assert_close(gh, rh)
    assert_close(gw, rw)
    with torch.no_grad():
        assert_close(linear_cross_entropy(hidden, weight, labels, V, softcap=4.0), ref)


# ----------------------------------------------------------------------------- zero-initialised projections


def test_zero_init_projections_make_every_block_the_identity_at_init(tmp_path):
    model = _gpt(zero_init_proj=True)
    for block in model.blocks:
        assert not block.attn.wo.weight.any() and not block.mlp.down.weight.any()
    ids = torch.randint(0, V, (2, 10))
    x = model.tok_emb(ids) + model.pos_emb(torch.arange(10)[None])
    for block in model.blocks:
        assert torch.equal(block(x, None, True), x)  # the residual branches add exactly zero
    assert_close(model(ids), model.lm_head(model.norm_f(x))[..., :V])
    model(ids).logsumexp(-1).sum().backward()  # ... and still learn: their gradients are not zero
    assert all(b.attn.wo.weight.grad.abs().sum() > 0 and b.mlp.down.weight.grad.abs().sum() > 0
               for b in model.blocks)
    model.zero_grad()
    _hf_logits_equal(_perturb(model), tmp_path, "gpt2")  # an initialisation: the architecture is GPT-2's


# ----------------------------------------------------------------------------- value embeddings


def test_value_embedding_tables_and_the_layers_that_read_them():
    c = GPTConfig(**{**SMALL, "n_layers": 6}, value_embeds=2, n_kv_heads=1)
    assert [c.value_table(i) for i in range(6)] == [0, 1, None, None, 0, 1]  # modded-nanogpt's 01..01
    model = build(c)
    assert len(model.value_emb) == 2 and model.value_emb[0].weight.shape == (128, 16)  # (Vpad, Hkv * Dh)
    assert [b.attn.value_mix is not None for b in model.blocks] == [True, True, False, False, True, True]
    assert arch_of(c).total_params == count_params(model)
    with pytest.raises(ValueError, match="value_embeds must be an integer from 0 to n_layers / 2"):
        GPTConfig(**SMALL, value_embeds=3)


def test_value_embeddings_mix_into_the_values():
    model = _gpt(value_embeds=1)
    plain = _gpt(value_embeds=0)
    plain.load_state_dict(model.state_dict(), strict=False)  # the same weights but the value tables
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        for block in model.blocks:
            if block.attn.value_mix is not None:
                block.attn.value_mix.copy_(torch.tensor([1.0, 0.0]))  # v <- 1 * v + 0 * ve
        assert_close(model(ids), plain(ids))
        model.blocks[0].attn.value_mix.copy_(torch.tensor([1.0, 1.0]))
        before = model(ids)
        model.value_emb[0].weight[ids[0, 4]] += 1.0  # one token's value row
        after = model(ids)
    changed = (after - before).abs().amax(-1)[0]  # (T,)
    first = int((ids[0] == ids[0, 4]).nonzero()[0])
    assert changed[first:].max() > 1e-3 and changed[:first].max() == 0  # causal: from that token on


def test_value_embeddings_decode_with_the_kv_cache_as_without(capsys, tmp_path):
    model = _perturb(_gpt(value_embeds=2))
    ids = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(1, 12)
        model.encode(ids[:, :8], cache=cache, cache_pos=torch.arange(8))
        for t in range(8, 12):
            step = model.logits(model.encode(ids[:, t:t + 1], cache=cache, cache_pos=torch.tensor([t])))
            assert_close(step[0, -1], full[0, t], atol=1e-5, rtol=1e-5)
    _refused_by_convert(model, tmp_path, capsys, "value_embeds")


# ----------------------------------------------------------------------------- configs


SWITCHES = {"act": "relu2", "qk_norm": True, "tie_embeddings": False, "logit_softcap": 15.0,
            "zero_init_proj": True, "value_embeds": 1}


def test_switches_round_trip_from_a_yaml_config_to_a_saved_model_and_back(tmp_path):
    yaml = tmp_path / "run.yaml"
    overrides = "\n".join(f"    {k}: {json.dumps(v)}" for k, v in SWITCHES.items())
    yaml.write_text(f"model:\n  preset: gpt-tiny\n  overrides:\n    dim: 32\n    n_layers: 2\n    n_heads: 2\n"
                    f"    vocab_size: 96\n{overrides}\n")
    cfg = load_config(yaml, {"data.synthetic": True, "train.out_dir": str(tmp_path / "run"), "train.device": "cpu",
                             "train.precision": "fp32", "train.max_steps": 2, "train.micro_batch_size": 2,
                             "data.seq_len": 16, "train.resume": "none", "log.progress": False,
                             "log.tensorboard": False, "log.plot": False, "log.peak_flops": 1e12, "eval.every": 0,
                             "checkpoint.every": 0, "optim.warmup_steps": 0})
    pretrain(cfg)
    lm = lmforge.load(tmp_path / "run" / "model")  # lmforge's format: transformers has no such GPT
    assert {k: getattr(lm.model.config, k) for k in SWITCHES} == SWITCHES
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["format"] == "lmforge" and {k: saved["model"][k] for k in SWITCHES} == SWITCHES
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        logits = lm.model(ids)
    assert logits.abs().max() < 15.0 and torch.isfinite(logits).all()
