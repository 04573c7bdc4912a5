import math

import pytest

from lmforge.config import OptimConfig
from lmforge.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_weight_decay_on_matrices_and_embeddings_only(gpt):
    model = gpt()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == {"tok_emb.weight", "pos_emb.weight"} | {
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.wqkv", "attn.wo", "mlp.up", "mlp.down")}
    assert plain == {n for n, _ in model.named_parameters() if n.endswith("bias") or "norm" in n}
    # the tied LM head is the embedding: optimised once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert "lm_head.weight" not in decayed and model.lm_head.weight is model.tok_emb.weight


def test_frozen_parameters_are_left_out(gpt):
    model = gpt()
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    groups = param_groups(model, 0.1)
    ids = {id(p) for g in groups for p in g["params"]}
    assert not ids & {id(p) for p in model.blocks[0].parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.1)


def test_optimizer_is_fused_when_available(gpt):
    assert build_optimizer(gpt(), OptimConfig()).defaults["fused"]
    opt = build_optimizer(gpt(), OptimConfig(fused=False))
    assert not opt.defaults["fused"] and opt.defaults["foreach"]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_shape(schedule):
    kw = dict(warmup_steps=4, total_steps=20, schedule=schedule, min_lr_ratio=0.1)
    assert [lr_factor(i, **kw) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, **kw) == 1.0
    end = lr_factor(19, **kw)
    assert math.isclose(end, 1.0 if schedule == "constant" else 0.1)
    values = [lr_factor(i, **kw) for i in range(4, 20)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never increases after warmup
    if schedule == "cosine":
        assert math.isclose(lr_factor(4 + 15 / 2, **kw), 0.55)  # halfway: midpoint of 1 and 0.1
    assert lr_factor(100, **kw) == end  # stays at the floor past the end


def test_scheduler_drives_the_optimizer_and_round_trips(gpt):
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, min_lr_ratio=0.0)
    opt = build_optimizer(gpt(), cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    state = sched.state_dict()
    opt2 = build_optimizer(gpt(), cfg)
    sched2 = build_scheduler(opt2, cfg, total_steps=10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(
        6, warmup_steps=2, total_steps=10, schedule="cosine", min_lr_ratio=0.0))


def test_warmup_stable_decay_is_a_trapezoid(gpt):
    kw = dict(warmup_steps=4, total_steps=20, schedule="wsd", min_lr_ratio=0.1, decay_fraction=0.25)
    lrs = [lr_factor(i, **kw) for i in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # warmup
    assert lrs[4:15] == [1.0] * 11  # stable: the peak until the last 25% of the steps (5)
    assert lrs[15:] == pytest.approx([0.82, 0.64, 0.46, 0.28, 0.1])  # a straight line down to the floor
    assert lr_factor(100, **kw) == pytest.approx(0.1)
    longer = {**kw, "total_steps": 40}  # a longer run is the same run until its own decay begins
    assert [lr_factor(i, **longer) for i in range(15)] == lrs[:15]
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.1)
    opt = build_optimizer(gpt(), cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * f for f in lrs])
