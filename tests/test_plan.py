"""The planner against the real thing: parameter counts of built models, FLOPs counted by
FlopCounterMode, tensors autograd saves, and peak memory of real training steps."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lmforge.hardware import GiB
from lmforge.interop.hf import config_from_hf
from lmforge.models import PRESETS, build, count_params, preset
from lmforge.nn.attention import _Heads
from lmforge.nn.lora import apply_lora
from lmforge.plan import engine_chunk_rows, make_plan
from lmforge.plan.arch import describe
from lmforge.plan.dataflow import Shape
from lmforge.plan.device import Device
from lmforge.plan.estimate import make_shape, max_micro_batch, memory_per_device
from lmforge.plan.memory import batch_bytes
from lmforge.plan.objective import loss, random_batch
from lmforge.plan.report import format_plan, format_verify, plan_json, verify_json
from lmforge.plan.verify import verify_plan

TINY = {
    "gpt": dict(vocab_size=300, max_seq_len=64, dim=32, n_layers=2, n_heads=4),
    "llama": dict(vocab_size=300, max_seq_len=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=80,
                  norm="rmsnorm", positions="rope", mlp="swiglu", bias=False),
}

# The encoders after BERT, as BertConfig variants.
ENCODERS = {
    "roberta": dict(positions="learned_skip_pad", type_vocab_size=1, pad_token_id=1, nsp=False),
    "distilbert": dict(type_vocab_size=0, pooler=False, nsp=False),
    "distilbert-sinusoidal": dict(type_vocab_size=0, pooler=False, nsp=False, positions="sinusoidal"),
}


def tiny(kind: str, **over):
    """Tiny configs of every family, built from presets with small overrides."""
    if kind in TINY:
        return preset("gpt-tiny", **{**TINY[kind], **over})
    if kind in ("bert", *ENCODERS):
        return preset("bert-tiny", **{"vocab_size": 300, "max_seq_len": 64, "dim": 32, "n_heads": 4,
                                      **ENCODERS.get(kind, {}), **over})
    if kind == "t5":  # T5 v1.1's layout: gated GELU, untied head; heads narrower than dim / n_heads
        return preset("t5-tiny", **{"vocab_size": 300, "max_seq_len": 64, "dim": 32, "n_heads": 4, "head_dim": 6,
                                    "hidden_dim": 48, "relative_buckets": 8, **over})
    return preset("bart-tiny", **{"vocab_size": 300, "max_seq_len": 64, "dim": 32, "n_heads": 4, **over})


def cpu_plan(config, **kw):
    """A plan with CPU kernels but the datasheet H100 timing, so no benchmark runs."""
    kw.setdefault("precision", "fp32")
    return make_plan(config, device="h100", backend="cpu", **kw)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_equal_the_built_model(name):
    with torch.device("meta"):
        model = build(preset(name))
    p = make_plan(name, seq_len=16).params
    assert p["total"] == count_params(model)
    assert p["without_positions"] == count_params(model, positions=False)
    assert p["trainable"] == count_params(model, trainable_only=True)
    assert p["embedding"] + p["non_embedding"] == p["total"]
    assert p["embedding"] >= model.tok_emb.weight.numel()


@pytest.mark.parametrize("over", [dict(tie_embeddings=False, bias=False), dict(positions="sinusoidal", n_kv_heads=1),
                                  dict(head_dim=48, hidden_dim=100, norm="rmsnorm", mlp="swiglu")])
def test_parameter_counts_of_custom_gpt_configs(over):
    config = tiny("gpt", **over)
    assert make_plan(config, seq_len=8).params["total"] == count_params(build(config))


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_encoder_variants_count_exactly(kind):
    config = tiny(kind)
    p = make_plan(config, seq_len=8).params
    assert p["total"] == count_params(build(config))
    assert p["without_positions"] == count_params(build(config), positions=False)


def test_encdec_variants_count_exactly():
    for over in (dict(norm_style="pre", n_decoder_layers=3),
                 dict(positions="sinusoidal", embed_norm=False, bias=False)):
        config = tiny("encdec", **over)
        assert make_plan(config, seq_len=8).params["total"] == count_params(build(config))


def _counted_flops(model: nn.Module, arch, shape: Shape, ce_chunk: int) -> int:
    batch = random_batch(arch, shape, "cpu")
    with FlopCounterMode(display=False) as counter:
        loss(model, arch, batch, ce_chunk).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", ["gpt", "llama", "bert", "encdec", "t5", *ENCODERS])
@pytest.mark.parametrize("ce_chunk", [0, 16])
def test_matmul_flops_equal_flop_counter(kind, ce_chunk):
    """With the reference attention (explicit matmuls) every FLOP is a counted GEMM, and
    the planner's forward + backward equals FlopCounterMode exactly — for the plain loss
    and for the chunked one, whose gradient GEMMs run inside its forward."""
    config = tiny(kind)
    model = build(config).train()
    for m in model.modules():
        if isinstance(m, _Heads):
            m.use_reference = True
    plan = cpu_plan(config, seq_len=24, target_len=16, batch_size=2, ce_chunk=ce_chunk)
    arch = describe(config)
    f = plan.flops
    expected = f["matmul_forward_per_micro_batch"] + f["matmul_backward_per_micro_batch"]
    assert _counted_flops(model, arch, make_shape(arch, plan.settings), ce_chunk) == expected
    assert f["recompute_per_micro_batch"] == 0


def test_flops_under_cpu_sdpa_and_the_chunked_loss():
    """The documented differences: CPU's fused attention kernel is not in the counter's
    table (it sees no attention FLOPs), and the chunked loss multiplies by the unpadded
    vocabulary where a plain LM head multiplies by the padded one."""
    config = tiny("gpt")
    model = build(config).train()
    arch = describe(config)
    chunked = cpu_plan(config, seq_len=32, batch_size=2, ce_chunk=16)
    plain = cpu_plan(config, seq_len=32, batch_size=2, ce_chunk=0)
    f = chunked.flops
    model_flops = f["matmul_forward_per_micro_batch"] + f["matmul_backward_per_micro_batch"]
    counted = _counted_flops(model, arch, make_shape(arch, chunked.settings), 16)
    assert counted == model_flops - 3 * f["attention_forward_per_micro_batch"]
    padding = 6 * 64 * config.dim * (arch.padded_vocab - arch.vocab_size)
    assert plain.flops["model_flops_per_step"] - f["model_flops_per_step"] == padding


def test_default_chunk_is_the_training_engines():
    from lmforge.train.objectives import _chunk_rows

    for name in ("gpt2-124m", "llama-small", "bart-base"):
        plan = make_plan(name, seq_len=128)
        assert plan.settings["ce_chunk"] == _chunk_rows(plan.config.vocab_size) == engine_chunk_rows(
            plan.config.vocab_size)


def test_gpt2_formula_and_exact_count_agree():
    f = make_plan("gpt2-124m", seq_len=1024, precision="bf16").flops
    L, H, Q, T, N = 12, 12, 64, 1024, 124475904 - 1024 * 768
    assert f["formula_per_token"] == 6 * N + 12 * L * H * Q * T
    assert abs(f["model_flops_per_token"] / f["formula_per_token"] - 1) < 0.01  # biases and norms are not GEMMs


def _saved_bytes(model: nn.Module, arch, shape: Shape, lowp: bool, ce_chunk: int) -> int:
    batch = random_batch(arch, shape, "cpu")
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *batch.values()]}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=lowp):
        loss(model, arch, batch, ce_chunk)
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["gpt", "llama", "bert", "encdec", "t5", *ENCODERS])
@pytest.mark.parametrize("precision,ce_chunk", [("fp32", 0), ("bf16", 0), ("fp32", 16), ("bf16", 16)])
def test_activation_bytes_equal_saved_tensors(kind, precision, ce_chunk):
    """Every tensor autograd keeps for backward, by storage: predicted equals measured up
    to the batch's own tensors (ids the embeddings and the loss keep)."""
    over = dict(dropout=0.1) if kind in ("gpt", "encdec") else {}
    config = tiny(kind, **over)
    model = build(config).train()
    plan = cpu_plan(config, seq_len=24, target_len=16, batch_size=2, ce_chunk=ce_chunk, precision=precision)
    arch = describe(config)
    shape = make_shape(arch, plan.settings)
    measured = _saved_bytes(model, arch, shape, precision == "bf16", ce_chunk)
    predicted = plan.memory["components"]["activations_saved"]
    assert measured > 50_000
    assert abs(predicted - measured) <= batch_bytes(arch, shape)


@pytest.mark.parametrize("kind,kw", [
    ("gpt", dict(precision="fp32", ce_chunk=64, batch_size=4)),
    ("llama", dict(precision="bf16", activation_checkpointing=True, grad_accum=2, batch_size=2)),
    ("bert", dict(precision="fp32", batch_size=4)),
    ("encdec", dict(precision="bf16", optimizer="sgd", batch_size=2)),
    ("t5", dict(precision="bf16", optimizer="sgd", batch_size=2)),
])
def test_peak_memory_of_real_steps_within_15_percent(kind, kw):
    plan = cpu_plan(tiny(kind, max_seq_len=128, dim=64, vocab_size=2000), seq_len=128, target_len=64, **kw)
    result = verify_plan(plan, steps=1)
    assert result["measured_peak_bytes"] > plan.memory["components"]["weights"]
    assert abs(result["peak_error"]) < 0.15, result
    assert "peak memory" in format_verify(result)
    assert json.loads(verify_json(result))["measured_peak_bytes"] == result["measured_peak_bytes"]


def test_json_output_parses_and_matches_the_plan():
    plan = make_plan("bart-tiny", seq_len=64, target_len=32, batch_size=4)
    d = json.loads(plan_json(plan))
    assert d["params"]["total"] == plan.params["total"]
    assert d["memory"]["peak"] == plan.memory["peak"]
    assert d["settings"]["target_len"] == 32
    assert d["config"]["dim"] == 128
    text = format_plan(plan)
    assert f"{plan.params['total']:,}" in text and "peak (predicted)" in text


def _lora_model(config, rank: int, targets: tuple[str, ...]) -> nn.Module:
    model = build(config).train()
    model.requires_grad_(False)
    apply_lora(model, targets, rank, alpha=16.0)
    return model


@pytest.mark.parametrize("kind", ["gpt", "llama", "encdec"])
def test_lora_counts_flops_and_saved_tensors_equal_the_real_adapters(kind):
    """nn.lora on a frozen model: parameter counts, FLOPs (frozen bases skip weight
    gradients, the first layer's input needs none) and saved tensors match exactly."""
    config, targets = tiny(kind), ("wqkv", "wo", "up")
    model = _lora_model(config, 4, targets)
    for m in model.modules():
        if isinstance(m, _Heads):
            m.use_reference = True
    plan = cpu_plan(config, seq_len=24, target_len=16, batch_size=2, lora_rank=4, lora_targets=targets, ce_chunk=16)
    assert plan.params["total"] == count_params(model)
    assert plan.params["trainable"] == count_params(model, trainable_only=True)
    arch = describe(config)
    shape = make_shape(arch, plan.settings)
    f = plan.flops
    assert _counted_flops(model, arch, shape, 16) == f["matmul_forward_per_micro_batch"] + f[
        "matmul_backward_per_micro_batch"]
    for m in model.modules():
        if isinstance(m, _Heads):
            m.use_reference = False
    for precision in ("fp32", "bf16"):
        p = cpu_plan(config, seq_len=24, target_len=16, batch_size=2, lora_rank=4, lora_targets=targets,
                     ce_chunk=16, precision=precision)
        measured = _saved_bytes(model, arch, shape, precision == "bf16", 16)
        assert abs(p.memory["components"]["activations_saved"] - measured) <= batch_bytes(arch, shape)


def test_lora_peak_memory_of_real_steps_within_15_percent():
    plan = cpu_plan(tiny("llama", max_seq_len=128, dim=64, vocab_size=2000), seq_len=128, batch_size=4,
                    precision="bf16", lora_rank=8, lora_targets=("wqkv", "wo", "gate", "up", "down"))
    result = verify_plan(plan, steps=1)
    assert abs(result["peak_error"]) < 0.15, result


def test_lora_shrinks_trainable_parameters_and_optimizer_state():
    config = tiny("llama")
    full = cpu_plan(config, seq_len=32, batch_size=2)
    lora = cpu_plan(config, seq_len=32, batch_size=2, lora_rank=4, lora_targets=("wqkv", "wo", "down"))
    model = build(config)
    expected = sum(4 * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name.split(".")[-1] in ("wqkv", "wo", "down"))
    assert lora.params["trainable"] == lora.params["lora_adapters"] == expected
    assert lora.params["total"] == full.params["total"] + expected
    comp = lora.memory["components"]
    assert comp["optimizer_states"] == 8 * expected and comp["gradients"] == 4 * expected
    assert comp["weights"] == 4 * lora.params["total"]
    assert lora.memory["peak"] < full.memory["peak"]
    # frozen bases save no inputs and skip weight gradients: fewer activations, less backward
    assert comp["activations_saved"] < full.memory["components"]["activations_saved"]
    assert lora.flops["matmul_backward_per_micro_batch"] < full.flops["matmul_backward_per_micro_batch"]


def test_fsdp_shards_state_across_devices_and_ddp_does_not():
    one = make_plan("gpt2-124m", seq_len=512, batch_size=4)
    fsdp = make_plan("gpt2-124m", seq_len=512, batch_size=4, devices=4, strategy="fsdp")
    ddp = make_plan("gpt2-124m", seq_len=512, batch_size=4, devices=4, strategy="ddp")
    for k in ("weights", "gradients", "optimizer_states"):
        assert fsdp.memory["components"][k] == one.memory["components"][k] // 4
        assert ddp.memory["components"][k] == one.memory["components"][k]
    assert fsdp.memory["components"]["activations_saved"] == one.memory["components"]["activations_saved"]
    assert fsdp.memory["peak"] < one.memory["peak"] < ddp.memory["peak"]
    assert ddp.time["tokens_per_step"] == 4 * one.time["tokens_per_step"]


def test_largest_micro_batch_is_consistent_with_the_memory_model():
    plan = make_plan("gpt2-124m", seq_len=512, batch_size=1, precision="bf16")
    arch, s = describe(plan.config), plan.settings
    peaks = [memory_per_device(arch, make_shape(arch, s, b), s, "cuda")["peak"] for b in (1, 2, 4, 8, 16, 32)]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    for gib in (4, 8, 24):
        dev = Device("test", "cpu", gib * GiB, {"bf16": 1e12}, 1e11, 0.5)
        b = max_micro_batch(arch, s, dev)
        assert b >= 1
        assert memory_per_device(arch, make_shape(arch, s, b), s, "cpu")["peak"] <= dev.memory
        assert memory_per_device(arch, make_shape(arch, s, b + 1), s, "cpu")["peak"] > dev.memory
    small = Device("test", "cpu", GiB, {"bf16": 1e12}, 1e11, 0.5)
    assert max_micro_batch(arch, s, small) == 0  # fp32 weights and AdamW states alone exceed 1 GiB


def test_activation_checkpointing_trades_memory_for_recompute():
    plain = make_plan("llama-small", seq_len=2048, batch_size=8)
    ac = make_plan("llama-small", seq_len=2048, batch_size=8, activation_checkpointing=True)
    assert ac.memory["peak"] < plain.memory["peak"] / 2
    assert ac.flops["hardware_flops_per_step"] > plain.flops["hardware_flops_per_step"]
    assert ac.max_micro_batch > plain.max_micro_batch


@pytest.mark.parametrize("kind", ["gpt", "llama", "encdec", "t5"])
def test_kv_cache_equals_the_models_cache(kind):
    config = tiny(kind)
    model = build(config)
    plan = cpu_plan(config, seq_len=32, target_len=16, batch_size=3, precision="bf16")
    max_len = 32 if kind not in ("encdec", "t5") else 16
    cache = model.make_cache(3, max_len, torch.bfloat16)
    expected = sum(b.nbytes for b in cache.buffers())
    if kind in ("encdec", "t5"):  # cross-attention keys/values of a 32-token source, per decoder layer, in bf16
        memory_kv = model.project_memory(torch.zeros(3, 32, config.dim))
        expected += sum(k.numel() + v.numel() for k, v in memory_kv) * 2
    assert plan.generation["kv_cache"] == expected


@pytest.mark.parametrize("kw,field", [
    (dict(precision="fp8"), "precision"), (dict(optimizer="lion"), "optimizer"), (dict(seq_len=4096), "seq_len"),
    (dict(batch_size=0), "batch_size"), (dict(strategy="zero3"), "strategy"), (dict(device="tpu"), "device"),
    (dict(lora_rank=4, lora_targets=("qproj",)), "lora_targets"),
])
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        make_plan("gpt-tiny", **{"seq_len": 64, **kw})


def test_plans_from_model_directories_and_config_files(tmp_path):
    config = tiny("llama")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps({"format": "lmforge", "family": "gpt",
                                                                "model": config.to_dict()}))
    assert make_plan(tmp_path / "ours", seq_len=16).params["total"] == count_params(build(config))
    hf = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 128}
    (tmp_path / "hf.json").write_text(json.dumps(hf))
    assert make_plan(str(tmp_path / "hf.json"), seq_len=16).params["total"] == count_params(
        build(config_from_hf(hf)))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        make_plan(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="missing"):
        make_plan(str(tmp_path / "missing"))


def test_unknown_preset_is_a_value_error():
    with pytest.raises(ValueError, match="unknown preset"):
        make_plan("gpt-5")


def test_plan_settings_round_trip_through_make_plan():
    plan = make_plan("bert-tiny", seq_len=64, batch_size=3, grad_accum=2, activation_checkpointing=True)
    again = make_plan(plan.config, **plan.settings)
    assert dataclasses.asdict(plan)["memory"] == dataclasses.asdict(again)["memory"]
