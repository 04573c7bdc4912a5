"""dist.state and the sharded checkpoint format, in one process (torch.distributed.checkpoint
needs no process group): the plain copy that FSDP2 training hands back, the DDP probe for
unused parameters, and a sharded checkpoint's manifest, verification and resharding load."""

import json

import pytest
import torch

from lmforge.config import OptimConfig
from lmforge.data.pretraining import SyntheticBatches
from lmforge.dist import parallel
from lmforge.dist import state as dist_state
from lmforge.models import BertConfig, GPTConfig, build
from lmforge.train import checkpoint
from lmforge.train.objectives import LossModule, clm, mlm, mlm_nsp
from lmforge.train.optim import build_optimizer

KW = {"vocab_size": 64, "max_seq_len": 16, "dim": 32, "n_layers": 2, "n_heads": 2}


def _gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return build(GPTConfig(**{**KW, **kw}))


def test_plain_copy_keeps_ties_buffers_and_values():
    model = _gpt(positions="rope")
    skeleton = dist_state.meta_skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters())
    copy = dist_state.plain_copy(skeleton, {k: v.clone() for k, v in model.state_dict().items()})
    assert not any(t.is_meta for t in [*copy.parameters(), *copy.buffers()])
    assert checkpoint.tied_aliases(copy) == checkpoint.tied_aliases(model)  # a tied LM head stays tied
    x = torch.randint(0, 64, (2, 16))
    model.eval(), copy.eval()
    torch.testing.assert_close(copy(x), model(x), rtol=0, atol=0)  # non-persistent buffers (RoPE) came along


def test_unsharded_leaves_a_model_fsdp_does_not_shard_alone():
    model = _gpt()
    with dist_state.unsharded(model):
        assert all(type(p) is torch.nn.Parameter for p in model.parameters())


@pytest.mark.parametrize(("objective", "unused"), [(clm, []), (mlm_nsp, []), (mlm, ["model.nsp_head.bias",
                                                                                        "model.nsp_head.weight"])])
def test_the_probe_finds_the_parameters_a_step_leaves_unused(objective, unused):
    """DDP's per-step search for unused parameters is switched on only where there are some:
    BERT's NSP head under plain masked LM (the pooler feeds only it, so it is unused too)."""
    torch.manual_seed(0)
    model = build(BertConfig(**KW)) if objective is not clm else _gpt()
    kind = {clm: "clm", mlm: "mlm", mlm_nsp: "mlm+nsp"}[objective]
    batch = next(SyntheticBatches(kind, batch_size=4, seq_len=16, vocab_size=64))
    found = parallel.unused_parameters(LossModule(model, objective), batch)
    assert sorted(n for n in found if "pooler" not in n) == unused
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradient behind


def _trained_optimizer(model):
    root = LossModule(model, clm)
    optimizer = build_optimizer(root, OptimConfig(lr=1e-2))
    batch = next(SyntheticBatches("clm", batch_size=2, seq_len=16, vocab_size=64))
    root(batch).loss.backward()
    optimizer.step()
    return root, optimizer


def test_a_sharded_checkpoint_verifies_and_loads_into_another_model(tmp_path):
    model = _gpt()
    root, optimizer = _trained_optimizer(model)
    path = checkpoint.save_sharded(tmp_path, 3, state=dist_state.sharded_state(model, root, optimizer),
                                   optimizer_state={"scheduler": {}, "scaler": {}},
                                   trainer_state={"step": 3, "world_size": 1, "ranks": []}, run_id="r1")
    manifest = checkpoint.verify(path)
    assert checkpoint.is_sharded(path) and manifest["world_size"] == 1 and manifest["run_id"] == "r1"
    assert any(name.startswith("dcp/") and name.endswith(".distcp") for name in manifest["files"])
    assert "dcp/.metadata" in manifest["files"] and not list(tmp_path.glob(".step_*"))  # renamed into place
    weights = checkpoint.model_weights(path)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0)

    fresh = _gpt(seed=1)
    fresh_root = LossModule(fresh, clm)
    fresh_optimizer = build_optimizer(fresh_root, OptimConfig(lr=1e-2))
    dist_state.load_sharded(fresh, fresh_root, fresh_optimizer, path / checkpoint.SHARDS)
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)
    ours = dist_state.full_optimizer_state(fresh_root, fresh_optimizer)["state"]
    theirs = dist_state.full_optimizer_state(root, optimizer)["state"]
    assert set(ours) == set(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name]["exp_avg_sq"], theirs[name]["exp_avg_sq"], rtol=0, atol=0)

    shard = next((path / checkpoint.SHARDS).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=f"{shard.name}: corrupt"):
        checkpoint.verify(path)
    assert checkpoint.latest_good(tmp_path) is None


def test_a_sharded_checkpoint_over_a_foreign_directory_is_refused(tmp_path):
    model = _gpt()
    root, optimizer = _trained_optimizer(model)
    foreign = checkpoint.step_dir(tmp_path, 5)
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a checkpoint lmforge wrote"):
        checkpoint.save_sharded(tmp_path, 5, state=dist_state.sharded_state(model, root, optimizer),
                                optimizer_state={}, trainer_state={"world_size": 1})
    assert (foreign / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".step_*"))
    assert json.loads(json.dumps(sorted(p.name for p in foreign.iterdir()))) == ["notes.txt"]
