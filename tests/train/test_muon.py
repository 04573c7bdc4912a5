"""Muon (optim.optimizer=muon): the Newton-Schulz iteration and the update against a hand
computation, which parameters it takes, the AdamW part against torch's, and a resumed run."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lmforge.config import OptimConfig, load_config
from lmforge.models import build, preset
from lmforge.train.loop import train
from lmforge.train.muon import Muon, newton_schulz
from lmforge.train.objectives import clm
from lmforge.train.optim import build_optimizer, muon_param_groups

A, B, C = 3.4445, -4.7750, 2.0315  # the published quintic coefficients (modded-nanogpt)


def hand_newton_schulz(G: torch.Tensor) -> torch.Tensor:
    """Five quintic Newton-Schulz steps, written out: X0 = G / ||G||_F (transposed when tall),
    then X <- A X + B (X X^T) X + C (X X^T)^2 X."""
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (X.pow(2).sum().sqrt() + 1e-7)
    for _ in range(5):
        gram = X @ X.T
        X = A * X + B * gram @ X + C * gram @ gram @ X
    return X.T if G.shape[0] > G.shape[1] else X


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
def test_newton_schulz_is_the_quintic_iteration_and_about_orthogonalises(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    ortho = newton_schulz(G)
    assert ortho.shape == shape
    assert_close(ortho, hand_newton_schulz(G), atol=1e-5, rtol=1e-5)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.T @ ortho @ Vh.T  # G's singular vectors are the result's: D is diagonal,
    assert_close(D, torch.diag(D.diagonal()), atol=1e-5, rtol=0)
    s = D.diagonal()  # and every singular value moved near 1 (not exactly: 5 steps)
    assert s.min() > 0.6 and s.max() < 1.25


class Tiny(nn.Module):
    """An embedding, one block with a 3 x 5 linear layer (with a bias), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(7, 5)
        self.blocks = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(5, 3)})])
        self.lm_head = nn.Linear(3, 7, bias=False)


def test_muon_update_against_a_hand_computation():
    torch.manual_seed(0)
    model = Tiny()
    cfg = OptimConfig(optimizer="muon", lr=1e-2, muon_lr=0.05, muon_momentum=0.9, muon_weight_decay=0.1,
                      weight_decay=0.0)
    opt = build_optimizer(model, cfg)
    W = model.blocks[0]["proj"].weight
    W0, lr, beta, wd = W.detach().clone(), 0.05, 0.9, 0.1
    G1, G2 = torch.randn(3, 5), torch.randn(3, 5)
    scale = math.sqrt(max(1, 3 / 5))  # a wide matrix: 1
    for G in (G1, G2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        W.grad = G.clone()
        opt.step()
    M1 = (1 - beta) * G1  # from a zero buffer
    W1 = W0 * (1 - lr * wd) - lr * scale * hand_newton_schulz((1 - beta) * G1 + beta * M1)
    M2 = beta * M1 + (1 - beta) * G2
    W2 = W1 * (1 - lr * wd) - lr * scale * hand_newton_schulz((1 - beta) * G2 + beta * M2)
    assert_close(W.detach(), W2, atol=1e-6, rtol=1e-5)
    assert_close(opt.state[W]["momentum_buffer"], M2)


def test_a_tall_matrix_update_is_scaled_by_the_root_of_its_aspect():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(3, 12, bias=False)])
    W = model.blocks[0].weight
    before = W.detach().clone()
    opt = Muon(muon_param_groups(model, OptimConfig(optimizer="muon", muon_lr=1.0)))
    W.grad = torch.randn(12, 3)
    opt.step()
    step = before - W.detach()
    assert_close(step, 2.0 * hand_newton_schulz(0.05 * W.grad + 0.95 * 0.05 * W.grad), atol=1e-5, rtol=1e-5)


def test_the_adamw_part_is_torchs_adamw():
    torch.manual_seed(0)
    ours, theirs = Tiny(), Tiny()
    theirs.load_state_dict(ours.state_dict())
    cfg = OptimConfig(optimizer="muon", lr=3e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    opt = build_optimizer(ours, cfg)
    ref = torch.optim.AdamW([{"params": [theirs.tok_emb.weight, theirs.lm_head.weight], "weight_decay": 0.1},
                             {"params": [theirs.blocks[0]["proj"].bias], "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.8, 0.9), eps=1e-6)
    for _ in range(3):
        for a, b in zip(ours.parameters(), theirs.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for name in ("tok_emb.weight", "lm_head.weight", "blocks.0.proj.bias"):
        assert_close(ours.get_parameter(name), theirs.get_parameter(name), atol=1e-7, rtol=1e-6)


def _names(model, group):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in group["params"]}


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = build(preset("gpt-tiny", vocab_size=64, dim=32, n_layers=4, n_heads=2, tie_embeddings=False,
                         value_embeds=1, qk_norm=True))
    groups = muon_param_groups(model, OptimConfig(optimizer="muon", weight_decay=0.1))
    muon = [g for g in groups if g["use_muon"]]
    adam = [g for g in groups if not g["use_muon"]]
    plain, fused = muon
    assert fused["split"] == (32, 32, 32) and plain["split"] is None  # queries, keys, values: one block each
    assert _names(model, fused) == {f"blocks.{i}.attn.wqkv.weight" for i in range(4)}
    assert _names(model, plain) == {f"blocks.{i}.{m}.weight" for i in range(4) for m in ("attn.wo", "mlp.up",
                                                                                          "mlp.down")}
    assert all(g["lr"] == 0.02 and g["momentum"] == 0.95 and g["weight_decay"] == 0.0 for g in muon)
    decay, no_decay = adam
    assert _names(model, decay) == {"tok_emb.weight", "pos_emb.weight", "lm_head.weight", "value_emb.0.weight"}
    assert decay["weight_decay"] == 0.1 and decay["lr"] == 3e-4 and no_decay["weight_decay"] == 0.0
    rest = {n for n, _ in model.named_parameters()} - _names(model, decay) - _names(model, plain) - _names(model, fused)
    assert _names(model, no_decay) == rest and all(n.endswith(("bias", "weight", "value_mix")) for n in rest)
    gqa = build(preset("llama-tiny", vocab_size=64, n_layers=1))  # 4 query heads, 2 key/value heads of 32
    assert [g["split"] for g in muon_param_groups(gqa, OptimConfig()) if g["use_muon"]] == [None, (128, 64, 64)]


def test_the_option_is_a_config_field():
    cfg = load_config(None, ["--optim.optimizer", "muon", "--optim.muon_lr", "0.03"])
    assert cfg.optim.optimizer == "muon" and cfg.optim.muon_lr == 0.03
    with pytest.raises(ValueError, match="optim.optimizer"):
        load_config(None, ["--optim.optimizer", "sgd"])


def test_a_muon_run_with_wsd_resumes_identically(gpt, batches_cls, make_clm_batch, run_config, clm_interrupted_at):
    data = [make_clm_batch(4, 16, seed=s) for s in range(5)]
    interrupt_at_fourth = clm_interrupted_at(4)  # like Ctrl-C during step 4

    common = {"train.max_steps": 8, "optim.warmup_steps": 2, "optim.optimizer": "muon", "optim.schedule": "wsd",
              "optim.decay_fraction": 0.5}
    cfg = run_config(**common, **{"train.resume": "auto"})
    res = train(gpt(), interrupt_at_fourth, batches_cls(data), cfg)
    assert res.stopped == "interrupted" and res.step == 4
    resumed = gpt(seed=123)
    train(resumed, clm, batches_cls(data), cfg)
    reference = gpt()
    train(reference, clm, batches_cls(data), run_config(**common, **{"train.out_dir": str(res.out_dir) + "-ref"}))
    for p, q in zip(resumed.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(reference.blocks[0].attn.wo.weight, gpt().blocks[0].attn.wo.weight)
