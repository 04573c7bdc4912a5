import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmforge.train.loop import TrainingError, train
from lmforge.train.objectives import clm


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _split(batch, k):
    return [{key: v.chunk(k)[i] for key, v in batch.items()} for i in range(k)]


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(gpt, batches_cls, make_clm_batch, run_config):
    big = []
    for s in range(3):
        b = make_clm_batch(8, 16, seed=s)
        b["labels"][:2, 5:] = -100  # uneven label counts: a mean per micro-batch would weight them wrongly
        big.append(b)
    one, accum = gpt(), gpt()
    train(one, clm, batches_cls(big), run_config(**{"train.max_steps": 3}))
    micro = [m for b in big for m in _split(b, 4)]
    train(accum, clm, batches_cls(micro), run_config(**{"train.max_steps": 3, "train.grad_accum": 4}))
    for (name, p), q in zip(one.named_parameters(), accum.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert not torch.equal(_params(one)["tok_emb.weight"], _params(gpt())["tok_emb.weight"])  # it trained


def test_tiny_model_overfits_one_batch(gpt, batches_cls, make_clm_batch, run_config):
    result = train(gpt(), clm, batches_cls([make_clm_batch(4, 16)]),
                   run_config(**{"train.max_steps": 150, "optim.lr": 1e-2, "optim.warmup_steps": 10,
                                 "optim.weight_decay": 0.0, "log.every": 10}))
    assert result.train_loss < 0.05, result.train_loss


@pytest.mark.parametrize("fused", [True, False])
def test_nan_step_is_skipped(gpt, batches_cls, make_clm_batch, run_config, fused):
    calls = {"n": 0}

    def nan_at_third(model, batch):
        out = clm(model, batch)
        calls["n"] += 1
        return out._replace(loss=out.loss * math.nan) if calls["n"] == 3 else out

    cfg = dict(**{"optim.schedule": "constant", "optim.fused": fused})
    skipped, clean = gpt(), gpt()
    data = [make_clm_batch(4, 16, seed=s) for s in range(2)] + [make_clm_batch(4, 16, seed=9)]
    res = train(skipped, nan_at_third, batches_cls(data), run_config(**cfg, **{"train.max_steps": 3}))
    train(clean, clm, batches_cls(data), run_config(**cfg, **{"train.max_steps": 2,
                                                             "train.out_dir": str(res.out_dir) + "-clean"}))
    for p, q in zip(skipped.parameters(), clean.parameters()):
        assert torch.equal(p, q)  # the NaN step changed nothing
    records = [json.loads(line) for line in (res.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 1 and math.isfinite(records[-1]["train_loss"])


def test_consecutive_nan_steps_stop_the_run(gpt, batches_cls, make_clm_batch, run_config):
    def always_nan(model, batch):
        out = clm(model, batch)
        return out._replace(loss=out.loss * math.nan)

    with pytest.raises(TrainingError, match="NaN/Inf for 3 steps in a row"):
        train(gpt(), always_nan, batches_cls([make_clm_batch(4, 16)]),
              run_config(**{"train.max_bad_steps": 3}))


def test_metrics_tensorboard_and_plot_are_written(gpt, batches_cls, make_clm_batch, run_config):
    cfg = run_config(**{"train.max_steps": 6, "log.every": 2, "log.tensorboard": True, "log.plot": True,
                        "eval.every": 3, "eval.steps": 2})
    val = [make_clm_batch(4, 16, seed=100 + i) for i in range(3)]
    res = train(gpt(), clm, batches_cls([make_clm_batch(4, 16)]), cfg, val_batches=val)
    records = [json.loads(line) for line in (res.out_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train_loss" in r]
    val_records = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert [r["step"] for r in val_records] == [3, 6]
    for r in train_records:
        assert r["lr"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["tokens"] == r["step"] * 64
    assert math.isclose(val_records[0]["val_ppl"], math.exp(val_records[0]["val_loss"]))
    assert res.val == {k: v for k, v in val_records[-1].items() if k != "step"}
    png = (res.out_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(res.out_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("val/loss")] == [3, 6]
    assert (res.out_dir / "config.yaml").is_file()


def test_sigint_checkpoints_then_resume_finishes_identically(gpt, batches_cls, make_clm_batch, run_config,
                                                             clm_interrupted_at):
    data = [make_clm_batch(4, 16, seed=s) for s in range(5)]
    interrupt_at_fourth = clm_interrupted_at(4)  # like Ctrl-C during step 4

    cfg = run_config(**{"train.max_steps": 8, "optim.warmup_steps": 2, "train.resume": "auto"})
    interrupted = gpt()
    res = train(interrupted, interrupt_at_fourth, batches_cls(data), cfg)
    assert res.stopped == "interrupted" and res.step == 4
    assert res.checkpoint.name == "step_00000004" and (res.checkpoint / "manifest.json").is_file()
    resumed = gpt(seed=123)  # different init: everything must come from the checkpoint
    res2 = train(resumed, clm, batches_cls(data), cfg)
    assert res2.step == 8 and res2.stopped == "max_steps"
    reference = gpt()
    train(reference, clm, batches_cls(data), run_config(**{"train.max_steps": 8, "optim.warmup_steps": 2,
                                                           "train.out_dir": str(res.out_dir) + "-ref"}))
    for p, q in zip(resumed.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_budget_and_data_end_stop_the_run(gpt, batches_cls, make_clm_batch, run_config):
    res = train(gpt(), clm, batches_cls([make_clm_batch(4, 16)]), run_config(**{"train.max_tokens": 200}))
    assert res.stopped == "max_tokens" and res.step == 4 and res.tokens == 256
    data = [make_clm_batch(4, 16, seed=s) for s in range(3)]
    res = train(gpt(), clm, batches_cls(data, cycle=False),
                run_config(**{"train.grad_accum": 2, "train.out_dir": str(res.out_dir) + "-2"}))
    assert res.stopped == "data_exhausted" and res.step == 1


def test_out_of_memory_says_what_to_change(gpt, batches_cls, make_clm_batch, run_config):
    def oom(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(TrainingError, match="lower train.micro_batch_size and raise train.grad_accum.*"
                                            "activation_checkpointing"):
        train(gpt(), oom, batches_cls([make_clm_batch(4, 16)]), run_config())


@pytest.mark.parametrize("name,seq_len,target_len,lm_fraction", [
    ("gpt2-124m", 1024, None, 1.0), ("llama-small", 512, None, 1.0),
    ("bert-base", 128, None, 0.15),  # masked LM: the vocabulary projection runs on the masked 15% only
    ("bart-base", 128, 64, 64 / 192),  # the decoder's share of source + target tokens
])
def test_mfu_flops_match_the_planners_exact_count(name, seq_len, target_len, lm_fraction):
    """The training log's 6N + 12LHQT per token agrees with the planner's walk over every matmul."""
    from lmforge.models import HeadSpec, attach_head, build, preset
    from lmforge.plan import make_plan
    from lmforge.train.logging import flops_per_token

    exact = make_plan(name, seq_len=seq_len, target_len=target_len, mlm_fraction=0.15).flops["model_flops_per_token"]
    with torch.device("meta"):
        model = build(preset(name))
    assert flops_per_token(model, seq_len, lm_fraction) == pytest.approx(exact, rel=0.02)
    if name == "bert-base":  # a classifier never projects onto the vocabulary, and a lookup costs nothing
        with torch.device("meta"):
            classifier = attach_head(model, HeadSpec("sequence-classification", ["a", "b"]))
        assert flops_per_token(classifier, seq_len) == pytest.approx(flops_per_token(model, seq_len, 0.0), rel=1e-4)


def test_logged_mfu_counts_the_vocabulary_projection_where_it_runs(bert, encdec, batches_cls, run_config, tmp_path):
    """Masked LM: on the masked positions only (the loss count); encoder-decoder: on the target side."""
    from lmforge.train.logging import flops_per_token
    from lmforge.train.objectives import denoise, mlm

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 64, (4, 16), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :3] = ids[:, :3]  # 12 of 64 positions masked
    masked = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
              "token_type_ids": torch.zeros_like(ids)}
    target = torch.randint(4, 64, (4, 8), generator=g)
    pairs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": target,
             "decoder_input_ids": torch.randint(4, 64, (4, 8), generator=g)}
    for make, objective, name, batch, fraction in ((bert, mlm, "mlm", masked, 12 / 64),
                                                   (encdec, denoise, "denoise", pairs, 32 / 96)):
        model = make()
        cfg = run_config(**{"train.max_steps": 2, "train.objective": name, "train.out_dir": str(tmp_path / name)})
        res = train(model, objective, batches_cls([batch]), cfg)
        r = [json.loads(line) for line in (res.out_dir / "metrics.jsonl").read_text().splitlines()][-1]
        assert r["mfu"] * 1e12 / r["tokens_per_s"] == pytest.approx(flops_per_token(model, 16, fraction))
        assert r["mfu"] < r["tokens_per_s"] * flops_per_token(model, 16) / 1e12  # less than counting every row


def test_early_stopping_is_the_loops_and_survives_a_resume(gpt, batches_cls, make_clm_batch, run_config):
    calls = []

    def evaluate_fn(model):
        calls.append(model.training)
        return {"val_score": 0.5}  # never improves after the first evaluation

    common = {"eval.every": 2, "eval.patience": 2, "checkpoint.every": 2, "checkpoint.metric": "val_score",
              "checkpoint.mode": "max", "train.resume": "auto"}
    batches = [make_clm_batch(4, 16, seed=s) for s in range(3)]
    first = train(gpt(), clm, batches_cls(batches), run_config(**{**common, "train.max_steps": 4}),
                  evaluate_fn=evaluate_fn)
    assert first.stopped == "max_steps"  # evaluations at 2 (best) and 4 (1 without improvement)
    again = train(gpt(), clm, batches_cls(batches), run_config(**{**common, "train.max_steps": 10}),
                  evaluate_fn=evaluate_fn)
    assert again.stopped == "early_stopping" and again.step == 6  # the count carried over the resume
    assert again.best == {"metric": "val_score", "value": 0.5, "step": 2}
    assert calls == [True] * 3  # evaluations at 2, 4, 6, given the model as the loop has it
