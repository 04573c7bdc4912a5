import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.train.objectives import LossModule, clm, denoise, linear_cross_entropy, mlm, mlm_nsp

V = 64  # the vocabulary of conftest's tiny models


@pytest.mark.parametrize("rows", [3, 7, 1000])
def test_linear_cross_entropy_matches_full_logits(rows):
    torch.manual_seed(0)
    N, D, Vpad, Vreal = 20, 8, 16, 13
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(Vpad, D, requires_grad=True)
    bias = torch.randn(Vpad)
    y = torch.randint(0, Vreal, (N,))
    y[[1, 5, 17]] = -100
    loss = linear_cross_entropy(h, w, y, Vreal, bias=bias, chunk_rows=rows)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2 @ w2.t() + bias)[:, :Vreal], y, ignore_index=-100, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)  # padded rows get zero gradient
    assert w.grad[Vreal:].abs().sum() == 0
    with torch.no_grad():  # the no-grad path gives the same value
        torch.testing.assert_close(linear_cross_entropy(h, w, y, Vreal, bias=bias, chunk_rows=rows), ref)


def test_clm_equals_cross_entropy_of_forward_logits(gpt, make_clm_batch):
    model = gpt()
    batch = make_clm_batch(3, 16)
    out = clm(model, batch)
    logits = model(batch["input_ids"])
    ref = F.cross_entropy(logits.reshape(-1, V), batch["labels"].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss, ref)
    assert out.count.item() == 3 * 16


def test_clm_without_labels_shifts_input_ids(gpt, make_clm_batch):
    model = gpt()
    ids = make_clm_batch(2, 16)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # right padding: no loss on or into padding
    derived = clm(model, {"input_ids": ids, "attention_mask": mask})
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[1, 9:] = -100
    explicit = clm(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    torch.testing.assert_close(derived.loss, explicit.loss)
    assert derived.count.item() == 15 + 9


def _mlm_batch(B=4, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, T), generator=g)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(B, T, generator=g) < 0.3
    chosen[:, 0] = True
    labels[chosen] = ids[chosen]
    ids = ids.masked_fill(chosen, 3)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "token_type_ids": torch.zeros_like(ids), "nsp_labels": torch.tensor([0, 1] * (B // 2))}


def test_mlm_scores_only_masked_positions(bert):
    model = bert().eval()
    batch = _mlm_batch()
    out = mlm(model, batch)
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    sel = batch["labels"] != -100
    ref = F.cross_entropy(logits[sel], batch["labels"][sel], reduction="sum")
    torch.testing.assert_close(out.loss, ref)
    assert out.count.item() == sel.sum().item()
    correct, n = out.metrics["mlm_acc"]
    assert correct.item() == (logits[sel].argmax(-1) == batch["labels"][sel]).sum().item() and n.item() == sel.sum()


def test_loss_at_init_is_about_ln_vocab(gpt, bert, encdec, make_clm_batch):
    """Random init gives near-uniform predictions: loss per token ~ ln V (and ln 2 for NSP)."""
    ln_v = math.log(V)
    out = clm(gpt(), make_clm_batch(8, 16))
    assert abs(out.loss.item() / out.count.item() - ln_v) < 0.1
    out = mlm(bert().eval(), _mlm_batch(8))
    assert abs(out.loss.item() / out.count.item() - ln_v) < 0.15
    out = mlm_nsp(bert().eval(), _mlm_batch(8))
    mlm_loss, n = out.metrics["mlm_loss"]
    nsp_loss, n_seq = out.metrics["nsp_loss"]
    assert abs(mlm_loss.item() / n.item() - ln_v) < 0.15
    assert abs(nsp_loss.item() / n_seq.item() - math.log(2)) < 0.1
    # loss / count is mean MLM + mean NSP
    torch.testing.assert_close(out.loss / out.count, mlm_loss / n + nsp_loss / n_seq)
    batch = make_clm_batch(8, 16)
    out = denoise(encdec().eval(), {"input_ids": batch["input_ids"], "labels": batch["labels"]})
    assert abs(out.loss.item() / out.count.item() - ln_v) < 0.1


def test_denoise_uses_shift_right_unless_decoder_inputs_given(encdec, make_clm_batch):
    model = encdec().eval()
    b = make_clm_batch(2, 12)
    src, labels = b["input_ids"], b["labels"].clone()
    labels[0, 8:] = -100
    implicit = denoise(model, {"input_ids": src, "labels": labels})
    explicit = denoise(model, {"input_ids": src, "labels": labels, "decoder_input_ids": model.shift_right(labels)})
    torch.testing.assert_close(implicit.loss, explicit.loss)
    logits = model(src, model.shift_right(labels))
    ref = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(implicit.loss, ref)
    assert implicit.count.item() == 12 + 8


def test_loss_module_forward_is_the_objective(gpt, make_clm_batch):
    model = gpt()
    batch = make_clm_batch(2, 8)
    torch.testing.assert_close(LossModule(model, clm)(batch).loss, clm(model, batch).loss)


def test_linear_cross_entropy_with_a_frozen_head():
    torch.manual_seed(0)
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(8, 4)  # frozen: no gradient wanted or computed
    y = torch.randint(0, 8, (6,))
    linear_cross_entropy(h, w, y, 8, chunk_rows=4).backward()
    h2 = h.detach().clone().requires_grad_()
    F.cross_entropy(h2 @ w.t(), y, reduction="sum").backward()
    torch.testing.assert_close(h.grad, h2.grad)
    assert w.grad is None
