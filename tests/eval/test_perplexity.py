import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.eval.perplexity import perplexity_of_text, sliding_window_nll, window_spans
from lmforge.models import GPT, GPTConfig


@pytest.fixture
def model() -> GPT:
    # Learned positions make every logit depend on where a token sits in its window,
    # so a window that starts in the wrong place cannot go unnoticed; a large init
    # std makes predictions far from uniform, so context matters.
    m = GPT(GPTConfig(vocab_size=61, max_seq_len=16, dim=32, n_layers=2, n_heads=2, vocab_multiple=8))
    m.init_weights(std=0.3)
    return m.eval()


def brute_force_nll(model: GPT, ids: torch.Tensor, max_len: int, stride: int) -> tuple[float, int]:
    """One forward pass per token: token j is predicted from ids[begin:j], where the
    window that scores it ends at e = min(max_len + k*stride, N-1) for the first k with e >= j."""
    last = len(ids) - 1
    total = 0.0
    for j in range(1, len(ids)):
        k = 0 if j <= max_len else (j - 1 - max_len) // stride + 1
        end = min(max_len + k * stride, last)
        begin = max(0, end - max_len)
        logits = model(ids[None, begin:j])[0, -1]
        total -= F.log_softmax(logits.double(), -1)[ids[j]].item()
    return total, last


@pytest.mark.parametrize("n,max_len,stride", [(2, 4, 4), (10, 4, 2), (37, 8, 3), (40, 8, 8), (9, 8, 1), (50, 5, 4)])
def test_window_spans_score_every_token_once_with_enough_context(n, max_len, stride):
    spans = window_spans(n, max_len, stride)
    scored = [p for _, e, s in spans for p in range(s, e)]
    assert scored == list(range(n - 1))  # each predicting position once, in order
    for b, e, s in spans:
        assert 0 <= b <= s < e <= n - 1 and e - b <= max_len
        for p in range(s, e):  # position p predicts token p + 1 from ids[b : p + 1]
            assert p + 1 - b >= min(p + 1, max_len - stride + 1)


def test_window_spans_stride_equal_max_len_is_disjoint_chunks():
    assert window_spans(10, 4, 4) == [(0, 4, 0), (4, 8, 4), (5, 9, 8)]
    assert window_spans(9, 4, 4) == [(0, 4, 0), (4, 8, 4)]


def test_single_window_equals_full_sequence(model):
    ids = torch.randint(0, 61, (13,))
    logits = model(ids[None, :-1])[0]
    expected = F.cross_entropy(logits, ids[1:], reduction="sum").item()
    out = sliding_window_nll(model, ids, max_len=16, stride=3)
    assert out["n_windows"] == 1 and out["n_tokens"] == 12
    assert out["nll_sum"] == pytest.approx(expected, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(expected / 12), rel=1e-5)


@pytest.mark.parametrize("max_len,stride", [(8, 8), (8, 3), (5, 1), (16, 5)])
def test_equals_brute_force(model, max_len, stride):
    ids = torch.randint(0, 61, (41,))
    expected, n = brute_force_nll(model, ids, max_len, stride)
    out = sliding_window_nll(model, ids, max_len=max_len, stride=stride, batch_size=3)
    assert out["n_tokens"] == n == 40
    assert out["nll_sum"] == pytest.approx(expected, rel=1e-5)
    assert out["mean_nll"] == pytest.approx(expected / n, rel=1e-5)


def test_batch_size_does_not_change_result(model):
    ids = torch.randint(0, 61, (60,))
    a = sliding_window_nll(model, ids, max_len=12, stride=5, batch_size=1)
    b = sliding_window_nll(model, ids, max_len=12, stride=5, batch_size=7)
    assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-6)
    assert a["n_windows"] == b["n_windows"]


def test_runs_in_eval_mode_and_restores_training_mode():
    m = GPT(GPTConfig(vocab_size=61, max_seq_len=16, dim=32, n_layers=2, n_heads=2, dropout=0.5, vocab_multiple=8))
    ids = torch.randint(0, 61, (30,))
    m.train()
    a = sliding_window_nll(m, ids, max_len=8, stride=4)
    b = sliding_window_nll(m, ids, max_len=8, stride=4)
    assert a["nll_sum"] == b["nll_sum"]  # dropout off while evaluating
    assert m.training


def test_bad_arguments_are_named(model):
    ids = torch.randint(0, 61, (20,))
    with pytest.raises(ValueError, match="stride must be in 1..max_len"):
        sliding_window_nll(model, ids, max_len=8, stride=9)
    with pytest.raises(ValueError, match="max_seq_len"):
        sliding_window_nll(model, ids, max_len=32)
    with pytest.raises(ValueError, match="1-D"):
        sliding_window_nll(model, ids[None], max_len=8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sliding_window_nll(model, ids[:1], max_len=8)


class CharTokenizer:
    """Stand-in tokenizer: one id per character (a-z and space), no special tokens."""

    alphabet = "abcdefghijklmnopqrstuvwxyz "

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.alphabet.index(c) for c in text]


def test_perplexity_of_text_reports_bits_per_char(model):
    text = "the quick brown fox jumps over the lazy dog and runs away"
    out = perplexity_of_text(model, CharTokenizer(), text, max_len=16, stride=8)
    direct = sliding_window_nll(model, CharTokenizer().encode(text), max_len=16, stride=8)
    assert out["nll_sum"] == pytest.approx(direct["nll_sum"])
    assert out["n_chars"] == len(text) == out["n_bytes"]
    assert out["bits_per_char"] == pytest.approx(out["nll_sum"] / math.log(2) / len(text))
    with pytest.raises(ValueError, match="need at least 2"):
        perplexity_of_text(model, CharTokenizer(), "a", max_len=16)
