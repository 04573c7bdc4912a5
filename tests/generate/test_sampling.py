"""The pure logits functions: exact values on small cases, agreement with transformers'
processors on random ones, and the sampler's distribution."""

import math

import pytest
import torch
from torch.testing import assert_close
from transformers.generation import logits_process as hfp

from lmforge.generate import sampling


def _logits_from_probs(*probs):
    return torch.tensor([probs]).log()


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sampling.greedy(logits).tolist() == [1, 0]


def test_temperature_scales_and_rejects_non_positive():
    logits = torch.tensor([[1.0, -2.0]])
    assert_close(sampling.apply_temperature(logits, 0.5), torch.tensor([[2.0, -4.0]]))
    with pytest.raises(ValueError, match="temperature"):
        sampling.apply_temperature(logits, 0.0)


def test_top_k_keeps_exactly_k_and_top_1_is_greedy():
    logits = torch.randn(5, 50)
    kept = sampling.top_k_filter(logits, 3).isfinite()
    assert kept.sum(dim=-1).tolist() == [3] * 5
    assert torch.equal(kept.nonzero()[:, 1].view(5, 3).sort().values, logits.topk(3).indices.sort().values)
    one = sampling.top_k_filter(logits, 1)
    assert torch.equal(sampling.sample(one, torch.Generator().manual_seed(0)), sampling.greedy(logits))
    assert sampling.top_k_filter(logits, 1000).isfinite().all()  # k > V keeps everything


@pytest.mark.parametrize("p, kept", [(0.45, [0]), (0.5, [0]), (0.75, [0, 1]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_smallest_set_reaching_p(p, kept):
    logits = _logits_from_probs(0.5, 0.3, 0.15, 0.05)[:, [2, 0, 3, 1]]  # shuffled: ids 1, 3, 0, 2 by rank
    rank_to_id = [1, 3, 0, 2]
    out = sampling.top_p_filter(logits, p)
    assert sorted(out[0].isfinite().nonzero()[:, 0].tolist()) == sorted(rank_to_id[r] for r in kept)
    assert_close(out[out.isfinite()], logits[out.isfinite()])  # kept logits unchanged


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    context = torch.tensor([[0, 1, 3]])
    mask = torch.tensor([[True, True, False]])  # token 3 is padding: not penalised
    out = sampling.apply_repetition_penalty(logits, context, mask, 2.0)
    assert_close(out, torch.tensor([[1.0, -4.0, 1.0, 3.0]]))


def test_no_repeat_ngram_bans_completions_of_seen_ngrams():
    logits = torch.zeros(1, 10)
    context = torch.tensor([[1, 2, 3, 1, 2]])
    banned = lambda n, mask=None: (~sampling.ban_repeated_ngrams(logits, context, mask, n).isfinite()).nonzero()[
        :, 1].tolist()
    assert banned(3) == [3]  # "1 2 3" seen, context ends with "1 2"
    assert banned(2) == [3]  # "2 3" seen, context ends with "2"
    assert banned(1) == [1, 2, 3]  # every seen token
    assert banned(6) == []  # not enough context
    # a window touching padding never bans
    assert banned(3, torch.tensor([[False, True, True, True, True]])) == []


def _random_case(N=4, L=12, V=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g), torch.randint(0, V, (N, L), generator=g)


@pytest.mark.parametrize("seed", range(3))
def test_processors_match_transformers(seed):
    logits, context = _random_case(seed=seed)
    for n in (1, 2, 3):
        assert torch.equal(sampling.ban_repeated_ngrams(logits, context, None, n),
                           hfp.NoRepeatNGramLogitsProcessor(n)(context, logits.clone()))
    assert_close(sampling.apply_repetition_penalty(logits, context, None, 1.7),
                 hfp.RepetitionPenaltyLogitsProcessor(1.7)(context, logits.clone()))
    assert torch.equal(sampling.top_k_filter(logits, 4), hfp.TopKLogitsWarper(4)(context, logits.clone()))
    for p in (0.3, 0.8, 0.95):
        assert torch.equal(sampling.top_p_filter(logits, p).isfinite(),
                           hfp.TopPLogitsWarper(p)(context, logits.clone()).isfinite())


def test_suppress_and_force_tokens():
    logits = torch.randn(2, 6)
    sup = sampling.suppress_tokens(logits, 4)
    assert not sup[:, 4].isfinite().any() and torch.equal(sup[:, :4], logits[:, :4])
    forced = sampling.force_token(logits, 5)
    assert sampling.greedy(forced).tolist() == [5, 5] and forced[:, 5].eq(0).all()
    assert not logits.isinf().any()  # inputs untouched


def test_sample_is_reproducible_by_seed_and_follows_the_distribution():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05, 0.0])
    logits = probs.log().expand(40000, 5)
    a = sampling.sample(logits, torch.Generator().manual_seed(1))
    b = sampling.sample(logits, torch.Generator().manual_seed(1))
    c = sampling.sample(logits, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    freq = torch.bincount(a, minlength=5).float() / len(a)
    assert freq[4] == 0  # probability 0 (-inf logit) is never drawn
    # 40k draws: each frequency within 5 standard deviations of its probability
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / len(a)).sqrt() + 1e-6).all(), freq


def test_tiny_temperature_sample_equals_greedy():
    logits = torch.randn(8, 30)
    cold = sampling.apply_temperature(logits, 1e-4)
    assert torch.equal(sampling.sample(cold, torch.Generator().manual_seed(0)), sampling.greedy(logits))


def test_token_logprobs_and_top():
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]])
    chosen, top_ids, top_lp = sampling.token_logprobs(logits, torch.tensor([1]), top=2)
    assert_close(chosen, torch.tensor([math.log(0.2)]))
    assert top_ids.tolist() == [[0, 1]]
    assert_close(top_lp.exp(), torch.tensor([[0.7, 0.2]]))
    assert sampling.token_logprobs(logits, torch.tensor([0]))[1] is None
