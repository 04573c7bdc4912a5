"""What dist.parallel applies in one process: compile and activation checkpointing leave the
math unchanged; block discovery covers every family; precision options train."""

import math

import pytest
import torch

from lmforge.config import load_config
from lmforge.dist import parallel
from lmforge.dist.parallel import DistEnv
from lmforge.models import BertConfig, EncoderDecoderConfig, GPTConfig, build
from lmforge.train.loop import train
from lmforge.train.objectives import LossModule, clm
from lmforge.data.pretraining import SyntheticBatches


def _gpt(seed=0):
    torch.manual_seed(seed)
    return build(GPTConfig(vocab_size=64, max_seq_len=16, dim=32, n_layers=2, n_heads=2))


def _grads(model, batch):
    model.zero_grad()
    out = LossModule(model, clm)(batch)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_transformer_blocks_of_every_family():
    kw = {"vocab_size": 64, "max_seq_len": 16, "dim": 32, "n_layers": 2, "n_heads": 2}
    assert len(parallel.transformer_blocks(build(GPTConfig(**kw)))) == 2
    assert len(parallel.transformer_blocks(build(BertConfig(**kw)))) == 2
    assert len(parallel.transformer_blocks(build(EncoderDecoderConfig(**kw, n_decoder_layers=3)))) == 5


def test_activation_checkpointing_keeps_gradients_and_names():
    batch = next(SyntheticBatches("clm", batch_size=2, seq_len=16, vocab_size=64))
    plain, checkpointed = _gpt(), _gpt()
    names = list(checkpointed.state_dict())
    parallel.parallelize(LossModule(checkpointed, clm), checkpointed, DistEnv(), activation_checkpointing=True)
    assert list(checkpointed.state_dict()) == names  # checkpoints stay loadable without the wrapper
    loss_a, grads_a = _grads(plain, batch)
    loss_b, grads_b = _grads(checkpointed, batch)
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    batch = next(SyntheticBatches("clm", batch_size=2, seq_len=16, vocab_size=64))
    eager, compiled = _gpt(), _gpt()
    parallel.parallelize(LossModule(compiled, clm), compiled, DistEnv(), compile=True, activation_checkpointing=True)
    loss_a, grads_a = _grads(eager, batch)
    loss_b, grads_b = _grads(compiled, batch)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, precision):
    cfg = load_config(None, {"train.out_dir": str(tmp_path), "train.device": "cpu", "train.precision": precision,
                             "train.max_steps": 30, "train.resume": "none", "optim.lr": 1e-2, "optim.warmup_steps": 3,
                             "log.every": 10, "log.progress": False, "log.tensorboard": False, "log.plot": False,
                             "log.peak_flops": 1e12, "eval.every": 0, "checkpoint.every": 0, "data.seq_len": 16})
    batch = next(SyntheticBatches("clm", batch_size=4, seq_len=16, vocab_size=64))

    class Same:
        def __iter__(self):
            return self

        def __next__(self):
            return batch

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    model = _gpt()
    result = train(model, clm, Same(), cfg)
    assert result.train_loss < math.log(64) - 1.0  # it learned the batch in reduced precision
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_a_single_process_refuses_strategy_none_only_under_torchrun(monkeypatch):
    assert parallel.init_distributed("none", device="cpu").world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="dist.strategy is 'none' but 2 processes"):
        parallel.init_distributed("none", device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        parallel.init_distributed("ddp", device="cpu")
