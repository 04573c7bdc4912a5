"""What only a GPU can check: the compiled training step, the CUDA-graph decode step, bf16
autocast against fp32, and fused AdamW with its on-device skip of a non-finite step.

Marked `cuda` and skipped where torch sees no GPU (every CI machine); bench/gpu_suite.py
runs them first on a GPU machine. Models are the tiny ones of the CPU tests (tests/conftest.py),
so that a failure points at a code path, not at a tolerance stretched by size.
"""

import copy
import math

import pytest
import torch
from torch._dynamo.utils import counters

from lmforge.generate import compile_decode_step, generate
from lmforge.models import GPT, GPTConfig
from lmforge.train import loop
from lmforge.train.logging import read_records
from lmforge.train.objectives import clm, mlm
from lmforge.train.optim import build_optimizer, param_groups

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = {"train.device": "cuda"}


def _losses(result) -> list[float]:
    return [r["train_loss"] for r in read_records(result.out_dir / "metrics.jsonl") if "train_loss" in r]


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# ---- compiled training step ----------------------------------------------------------------------

def test_compiled_training_step_matches_eager(gpt, batches_cls, make_clm_batch, run_config, tmp_path):
    """train.compile compiles every block (one graph serves them all) and trains as eager does."""
    data = [make_clm_batch(4, 16, seed=s) for s in range(3)]
    layers = 4
    eager, compiled = gpt(n_layers=layers), gpt(n_layers=layers)
    steps = {"train.max_steps": 5, **CUDA}
    r_eager = loop.train(eager, clm, batches_cls(data), run_config(**steps, **{"train.out_dir": str(tmp_path / "e")}))
    torch._dynamo.reset()
    counters.clear()
    r_comp = loop.train(compiled, clm, batches_cls(data),
                        run_config(**steps, **{"train.compile": True, "train.out_dir": str(tmp_path / "c")}))
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs < layers, graphs  # dynamo compiled the blocks, not once per layer
    torch.testing.assert_close(_losses(r_comp), _losses(r_eager), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


# ---- CUDA-graph decoding -------------------------------------------------------------------------

def _sharp_gpt(kind: str) -> GPT:
    """A tiny GPT with enlarged weights: random init gives near-uniform logits, larger
    weights clear argmax margins, so that equal tokens test equal computation."""
    extra = dict(positions="rope", n_kv_heads=2, norm="rmsnorm", mlp="swiglu", bias=False) if kind == "rope" else {}
    model = GPT(GPTConfig(vocab_size=97, max_seq_len=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                          tie_embeddings=False, **extra))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    return model.cuda().eval()


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(map(len, prompts))
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("kind", ["learned", "rope"])
def test_cuda_graph_decode_equals_eager(kind):
    """The compiled one-token step replays as a CUDA graph (inductor skipped none) and gives
    the eager loop's tokens: for a padded batch, again from the kept cache, and (Llama-style)
    at another batch size, a second graph."""
    model = _sharp_gpt(kind)
    ids, mask = _left_padded([[5, 17, 33, 8, 41], [60, 2, 9, 71, 13, 22, 86, 30], [44, 3, 90]])
    torch._dynamo.reset()
    counters.clear()
    step = compile_decode_step(model)
    with torch.inference_mode():
        eager = generate(model, ids, mask, max_new_tokens=12).tokens
        graph = generate(model, ids, mask, max_new_tokens=12, decode_step=step).tokens
        again = generate(model, ids, mask, max_new_tokens=12, decode_step=step).tokens
        assert torch.equal(graph, eager) and torch.equal(again, eager)
        if kind == "rope":  # one recompilation for both kinds would only cost time
            one_eager = generate(model, ids[1:2], mask[1:2], max_new_tokens=12).tokens
            one_graph = generate(model, ids[1:2], mask[1:2], max_new_tokens=12, decode_step=step).tokens
            assert torch.equal(one_graph, one_eager)
    assert counters["inductor"]["cudagraph_skips"] == 0


# ---- bf16 against fp32 ---------------------------------------------------------------------------

def _forward(model, family: str, ids: torch.Tensor) -> torch.Tensor:
    if family == "encdec":
        return model(ids, ids[:, :8])
    return model(ids)


@pytest.mark.parametrize("family", ["gpt", "llama", "bert", "encdec"])
def test_bf16_autocast_forward_matches_fp32(family, gpt, bert, encdec):
    """Logits under bf16 autocast (SDPA's fused kernels) within bf16's error of the fp32 ones."""
    make = {"gpt": gpt, "bert": bert, "encdec": encdec,
            "llama": lambda: gpt(positions="rope", n_kv_heads=1, norm="rmsnorm", mlp="swiglu", bias=False)}[family]
    model = make().cuda().eval()
    ids = torch.randint(4, 64, (4, 32), device="cuda")
    with torch.no_grad():
        ref = _forward(model, family, ids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = _forward(model, family, ids)
    err = _rel_error(out, ref)
    assert 1e-5 < err < 2e-2, err  # bf16 really ran, and no worse than its rounding


def test_bf16_training_follows_the_fp32_curve(gpt, batches_cls, make_clm_batch, run_config, tmp_path):
    """Overfitting one batch: the bf16 run's loss stays on the fp32 run's curve."""
    data = [make_clm_batch(4, 16)]
    cfg = {"train.max_steps": 40, "optim.lr": 1e-2, "optim.warmup_steps": 5, **CUDA}
    fp32 = loop.train(gpt(), clm, batches_cls(data), run_config(**cfg, **{"train.out_dir": str(tmp_path / "f")}))
    bf16 = loop.train(gpt(), clm, batches_cls(data),
                      run_config(**cfg, **{"train.precision": "bf16", "train.out_dir": str(tmp_path / "b")}))
    a, b = _losses(fp32), _losses(bf16)
    assert a[-1] < 0.5 * a[0]  # it learned
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)


def test_bf16_masked_lm_step_matches_fp32(bert, batches_cls, run_config, tmp_path):
    """The masked-LM objective (head on the masked rows only) under bf16 gives the fp32 loss."""
    ids = torch.randint(4, 64, (4, 16))
    labels = torch.full_like(ids, -100)
    labels[:, ::5] = ids[:, ::5]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    cfg = {"train.max_steps": 3, "train.objective": "mlm", **CUDA}
    runs = {p: loop.train(bert(), mlm, batches_cls([batch]),
                          run_config(**cfg, **{"train.precision": p, "train.out_dir": str(tmp_path / p)}))
            for p in ("fp32", "bf16")}
    torch.testing.assert_close(_losses(runs["bf16"]), _losses(runs["fp32"]), rtol=0.02, atol=0.02)


# ---- fused AdamW ---------------------------------------------------------------------------------

def test_fused_adamw_is_chosen_and_equals_foreach(gpt, run_config):
    """On CUDA the engine's AdamW is the fused kernel, and it takes torch's foreach steps."""
    model = gpt().cuda()
    cfg = run_config(**CUDA).optim
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    twin = copy.deepcopy(model)
    ref = torch.optim.AdamW(param_groups(twin, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            foreach=True)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        ref.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_training_steps_make_no_host_sync_and_skip_a_nan_step_on_the_device(gpt, batches_cls, make_clm_batch,
                                                                             run_config):
    """Between log steps the loop never waits for the GPU (CUDA's sync debug mode raises on
    any synchronising call), and a NaN gradient skips the fused update on the device."""
    calls = {"n": 0}

    def nan_at_third(model, batch):
        out = clm(model, batch)
        calls["n"] += 1
        return out._replace(loss=out.loss * math.nan) if calls["n"] == 3 else out

    data = batches_cls([make_clm_batch(4, 16, seed=s) for s in range(3)])
    run = loop._setup(gpt(), nan_at_third, data, run_config(**CUDA, **{"log.every": 100}))
    assert run.fused
    batches = iter(data)
    loop._train_step(run, batches)  # warm-up: optimizer states, kernels, pinned buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clean = loop._train_step(run, batches)
        before = [p.detach().clone() for p in run.root.parameters()]
        bad = loop._train_step(run, batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not bool(clean.found_inf) and bool(bad.found_inf)
    for p, q in zip(run.root.parameters(), before):
        assert torch.equal(p, q)  # the NaN step changed nothing
