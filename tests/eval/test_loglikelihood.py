"""Scoring continuations: packed shared contexts equal one forward pass per pair, the
tokenization and rolling windows are lm-evaluation-harness's own (its code is the reference)."""

import random

import pytest
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import processors

from lmforge.eval.loglikelihood import (
    encode_pairs,
    loglikelihood,
    loglikelihood_rolling,
    pack_rows,
    rolling_pairs,
    score_pairs,
)
from lmforge.eval.perplexity import sliding_window_nll
from lmforge.models import GPT, GPTConfig
from lmforge.tokenizer import train_tokenizer

LLAMA = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, n_kv_heads=1, tie_embeddings=False)


def _model(V=61, T=24, **kw) -> GPT:
    m = GPT(GPTConfig(vocab_size=V, max_seq_len=T, dim=32, n_layers=2, n_heads=2, vocab_multiple=8, **kw))
    m.init_weights(std=0.3)
    return m.eval()


def _pairs(seed=0, V=61) -> list[tuple[list[int], list[int]]]:
    """Contexts with 1-4 continuations each, some of one token, one longer than the window."""
    rnd = random.Random(seed)
    pairs = []
    for _ in range(8):
        ctx = [rnd.randrange(V) for _ in range(rnd.randint(1, 12))]
        pairs += [(ctx, [rnd.randrange(V) for _ in range(rnd.randint(1, 9))]) for _ in range(rnd.randint(1, 4))]
    return pairs + [([5] * 30, [7, 8, 9])]


def _one_by_one(model, pairs, window):
    """lm-evaluation-harness's recipe: (context + continuation)[-(window + 1):][:-1], full forward."""
    out = []
    for ctx, cont in pairs:
        with torch.no_grad():
            logp = model(torch.tensor([(ctx + cont)[-(window + 1):][:-1]]))[0, -len(cont):].log_softmax(-1)
        target = torch.tensor(cont)
        out.append((logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
    return out


@pytest.mark.parametrize("arch", [{}, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_packed_rows_equal_one_forward_per_pair(arch, batch_size):
    model, pairs = _model(**arch), _pairs()
    expected = _one_by_one(model, pairs, 24)
    for share in (True, False):
        got = score_pairs(model, pairs, batch_size=batch_size, share_contexts=share)
        assert [g for _, g in got] == [g for _, g in expected]
        torch.testing.assert_close([ll for ll, _ in got], [ll for ll, _ in expected], atol=1e-4, rtol=1e-5)


def test_packing_shares_contexts_within_the_window():
    pairs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([9], [4]), ([1, 2, 3], [7, 8, 9])]
    rows = pack_rows(pairs, max_length=5)
    # [1 2 3 | 4] holds [4 5] and [6] (a one-token continuation adds no input); [7 8 9] would make
    # it 6 ids long, so it starts a row of its own. Rows come longest first.
    assert [(r.tokens, r.branches) for r in rows] == [([1, 2, 3, 7, 8], 1), ([1, 2, 3, 4], 2), ([9], 1)]
    shared = rows[1]
    assert shared.positions == [0, 1, 2, 3] and shared.segments == [0, 0, 0, 1]
    assert shared.scored == [2, 3, 2] and shared.targets == [4, 5, 6] and shared.owners == [0, 0, 1]


def test_window_too_small_for_a_continuation_is_an_error():
    with pytest.raises(ValueError, match="request 1: the continuation has 30 tokens, more than the model's window"):
        score_pairs(_model(), [([1], [2]), ([1], [3] * 30)])
    with pytest.raises(ValueError, match="request 0: the continuation encodes to no tokens"):
        score_pairs(_model(), [([1], [])])


@pytest.mark.parametrize("n,window", [(1, 4), (4, 4), (5, 4), (9, 4), (23, 5), (40, 8)])
def test_rolling_windows_are_lm_evals(n, window):
    ids = list(range(100, 100 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, prefix_token=7, max_seq_len=window,
                                                                         context_len=1)]
    assert rolling_pairs(ids, 7, window) == [(list(a), list(b)) for a, b in theirs]


class _Recorder(TemplateLM):
    """lm-evaluation-harness's own request tokenization (TemplateLM.loglikelihood) on our tokenizer."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    @property
    def eot_token_id(self):
        return self.tok.eos_id

    @property
    def prefix_token_id(self):
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tok.encode(string, add_special_tokens=True if add_special_tokens is None else add_special_tokens)

    def _loglikelihood_tokens(self, requests, **kwargs):
        return [(ctx, cont) for _, ctx, cont in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


class _Req:
    def __init__(self, *args):
        self.args = args


@pytest.mark.parametrize("kind", ["bpe", "unigram", "unigram+bos"])
def test_pair_tokenization_is_lm_evals(kind):
    tok = train_tokenizer(texts=["the quick brown fox jumps over the lazy dog", "a cat sat on the mat, then slept",
                                 "Question: why?\nAnswer: because"] * 20, kind=kind.split("+")[0], vocab_size=300,
                          min_frequency=1)
    if kind.endswith("+bos"):  # Llama's tokenizers prepend <s> to every encoding
        tok.backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                   special_tokens=[("<s>", tok.bos_id)])
    pairs = [("the quick brown", " fox"), ("Question: why?\nAnswer:", " because it"), ("the lazy ", "dog"),
             ("", "the cat"), ("", " sat"), ("a cat sat on the", " mat, then slept"), ("tail  \n", "x"),
             ("the cat", " sat")]  # "the cat" alone above: encoded without special tokens there, with them here
    assert encode_pairs(tok, pairs) == _Recorder(tok).loglikelihood([_Req(*p) for p in pairs], disable_tqdm=True)


def test_rolling_loglikelihood_is_the_sliding_window_with_a_prefix():
    tok = train_tokenizer(texts=["one two three four five six seven eight nine ten"] * 20, kind="bpe",
                          vocab_size=300, min_frequency=1)
    model = _model(V=tok.vocab_size, T=8)
    texts = ["one two three four five six seven eight nine ten " * 3, "two", "nine ten one"]
    ours = loglikelihood_rolling(model, tok, texts, batch_size=3)
    for text, ll in zip(texts, ours):
        ids = [tok.bos_id, *tok.encode(text)]
        ref = sliding_window_nll(model, ids, max_len=8, stride=8)["nll_sum"]
        assert ll == pytest.approx(-ref, rel=1e-5)


def test_bf16_runs_and_stays_close_to_fp32():
    tok = train_tokenizer(texts=["the quick brown fox jumps over the lazy dog"] * 20, kind="bpe", vocab_size=280,
                          min_frequency=1)
    model = _model(V=tok.vocab_size, T=32, **LLAMA)
    model.init_weights(std=0.05)  # bf16's 8-bit mantissa: keep logits moderate
    pairs = [("the quick brown", " fox jumps"), ("the lazy", " dog"), ("the lazy", " fox")]
    fp32 = loglikelihood(model, tok, pairs)
    bf16 = loglikelihood(model.to(torch.bfloat16), tok, pairs)
    torch.testing.assert_close([ll for ll, _ in bf16], [ll for ll, _ in fp32], rtol=0.03, atol=0.2)
