import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lmforge.data.collators import (
    IGNORE_INDEX,
    CausalLMCollator,
    DenoisingCollator,
    MLMCollator,
    NSPCollator,
    VocabInfo,
    clm_pad,
    clm_windows,
    mask_tokens,
    nsp_pairs,
    permute_sentences,
    span_corrupt,
    split_segments,
    text_infill,
    truncate_pair,
    word_continuation_table,
)

PAD, UNK, CLS, SEP, MASK, BOS, EOS = 0, 1, 2, 3, 4, 5, 6
N_SPECIAL = 7


class FakeWordPiece:
    """Tokens 0..6 special; a token i >= 7 with i % 3 == 0 is a "##" continuation."""

    def __init__(self, size: int = 1000) -> None:
        self.vocab_size = size
        self.special_ids = list(range(N_SPECIAL))

    def id_to_token(self, i: int) -> str:
        if i < N_SPECIAL:
            return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"][i]
        return f"##p{i}" if i % 3 == 0 else f"w{i}"


def vocab(size: int = 1000, **kw) -> VocabInfo:
    return VocabInfo(vocab_size=size, pad_id=PAD, mask_id=MASK, cls_id=CLS, sep_id=SEP, bos_id=BOS, eos_id=EOS,
                     special_ids=(UNK,), **kw)


def random_bert_batch(n: int, g: torch.Generator, size: int = 1000) -> list[torch.Tensor]:
    lengths = torch.randint(20, 120, (n,), generator=g)
    cls, sep = torch.tensor([CLS]), torch.tensor([SEP])
    return [torch.cat([cls, torch.randint(N_SPECIAL, size, (int(m),), generator=g), sep]) for m in lengths]


# ----------------------------------------------------------------------------- vocabulary facts


def test_word_continuation_table_schemes():
    table = word_continuation_table(FakeWordPiece(30))
    expected = [i >= N_SPECIAL and i % 3 == 0 for i in range(30)]
    assert table.tolist() == expected

    class ByteLevel:
        vocab_size, special_ids = 5, [0]

        def id_to_token(self, i):
            return ["<|endoftext|>", "Ġthe", "ing", "Ġcat", "s"][i]

    assert word_continuation_table(ByteLevel()).tolist() == [False, False, True, False, True]

    class Chars:
        vocab_size, special_ids = 3, []

        def id_to_token(self, i):
            return "abc"[i]

    with pytest.raises(ValueError, match="scheme="):
        word_continuation_table(Chars())


def test_vocab_info_validates_ids():
    with pytest.raises(ValueError, match="mask_id"):
        VocabInfo(vocab_size=10, pad_id=0, mask_id=10)
    with pytest.raises(ValueError, match="continues_word"):
        VocabInfo(vocab_size=10, pad_id=0, continues_word=torch.zeros(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_id"):
        MLMCollator(VocabInfo(vocab_size=10, pad_id=0))


# ----------------------------------------------------------------------------- causal LM


def test_clm_windows_shift():
    w = torch.arange(12).reshape(2, 6)
    out = clm_windows(w)
    assert torch.equal(out["input_ids"], w[:, :5]) and torch.equal(out["labels"], w[:, 1:])
    assert out["input_ids"].dtype == torch.int64 and set(out) == {"input_ids", "labels"}
    with pytest.raises(ValueError, match="pad_id"):
        CausalLMCollator()([[1, 2, 3], [1, 2]])


def test_clm_pad_labels_and_mask():
    out = clm_pad([np.array([5, 6, 7, 8], dtype=np.uint16), [9, 10]], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert out["labels"].tolist() == [[6, 7, 8], [10, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.int64 for t in out.values())
    assert CausalLMCollator(pad_id=0, max_len=2)([[1, 2, 3, 4]])["labels"].tolist() == [[2, 3]]
    with pytest.raises(ValueError, match="at least 2"):
        clm_pad([[1, 2], [3]], pad_id=0)


# ----------------------------------------------------------------------------- masked LM


def test_mlm_proportions_and_invariants():
    g = torch.Generator().manual_seed(1)
    seqs = random_bert_batch(400, g)
    out = MLMCollator(vocab(), seed=3)(seqs)
    original, mask = MLMCollator(vocab(), prob=0.0)(seqs)["input_ids"], out["attention_mask"]
    selected = out["labels"] != IGNORE_INDEX
    special = original < N_SPECIAL
    eligible = mask.bool() & ~special
    assert not (selected & ~eligible).any()  # specials and padding never selected
    assert abs(selected.sum().item() / eligible.sum().item() - 0.15) < 0.004
    # Per row, the count is 0.15 * n rounded up or down.
    n, k = eligible.sum(1).double(), selected.sum(1).double()
    assert ((k - 0.15 * n).abs() < 1).all()
    assert torch.equal(out["labels"][selected], original[selected])
    assert torch.equal(out["input_ids"][~selected], original[~selected])
    inp, orig = out["input_ids"][selected], original[selected]
    total = selected.sum().item()
    to_mask, kept = (inp == MASK).sum().item() / total, (inp == orig).sum().item() / total
    replaced = inp[(inp != MASK) & (inp != orig)]
    assert abs(to_mask - 0.8) < 0.015 and abs(kept - 0.1) < 0.012 and abs(len(replaced) / total - 0.1) < 0.012
    assert (replaced >= N_SPECIAL).all() and (replaced < 1000).all()


def test_mlm_random_tokens_never_special_anywhere_in_vocab():
    v = VocabInfo(vocab_size=20, pad_id=0, mask_id=1, special_ids=(2, 10, 19))
    ids = torch.full((64, 200), 5)
    out, _ = mask_tokens(ids, v, prob=1.0, mask_frac=0.0, random_frac=1.0, generator=torch.Generator().manual_seed(0))
    drawn = set(out.unique().tolist())
    assert drawn == set(range(20)) - {0, 1, 2, 10, 19}


def test_mlm_reproducible_and_token_type_passthrough():
    seqs = [{"input_ids": list(range(10, 40)), "token_type_ids": [0] * 15 + [1] * 15}, {"input_ids": [2, 50, 51, 3],
                                                                                       "token_type_ids": [0, 0, 0, 0]}]
    a, b = MLMCollator(vocab(), seed=7)(seqs), MLMCollator(vocab(), seed=7)(seqs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["token_type_ids"].tolist() == [[0] * 15 + [1] * 15, [0] * 4 + [0] * 26]
    c = MLMCollator(vocab(), seed=8)
    assert any(not torch.equal(a["labels"], c(seqs)["labels"]) for _ in range(3))
    # Consecutive calls of one collator differ (the generator advances).
    col = MLMCollator(vocab(), seed=7)
    assert not torch.equal(col(seqs * 20)["labels"], col(seqs * 20)["labels"])


def test_mlm_dataloader_workers_and_epochs_differ_but_reproduce():
    data = [list(range(10, 200))] * 8

    def epochs(loader_seed: int) -> list[torch.Tensor]:
        loader = DataLoader(data, batch_size=2, num_workers=2, collate_fn=MLMCollator(vocab(), seed=1),
                            generator=torch.Generator().manual_seed(loader_seed))
        return [batch["labels"] for _ in range(2) for batch in loader]

    first = epochs(0)
    assert len({tuple(b.flatten().tolist()) for b in first}) == len(first)  # no two batches masked alike
    assert all(torch.equal(a, b) for a, b in zip(first, epochs(0)))
    assert not all(torch.equal(a, b) for a, b in zip(first, epochs(1)))


def test_mlm_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        MLMCollator(vocab())([[5, 1000]])


def test_whole_word_masking_masks_whole_words():
    table = word_continuation_table(FakeWordPiece())
    v = vocab(continues_word=table)
    g = torch.Generator().manual_seed(2)
    seqs = random_bert_batch(300, g)
    seqs[0][1] = 9  # a "##" token right after [CLS] starts its own word
    out = MLMCollator(v, whole_word=True, seed=5)(seqs)
    original = MLMCollator(v, prob=0.0)(seqs)["input_ids"]
    selected = out["labels"] != IGNORE_INDEX
    eligible = out["attention_mask"].bool() & (original >= N_SPECIAL)
    assert not (selected & ~eligible).any()
    assert abs(selected.sum().item() / eligible.sum().item() - 0.15) < 0.007
    multi_token_words = 0
    for row in range(len(seqs)):
        ids, sel = original[row].tolist(), selected[row].tolist()
        words, cur = [], []
        for i, t in enumerate(ids):
            if t < N_SPECIAL:
                cur = []
                continue
            if not (table[t] and cur):
                cur = []
                words.append(cur)
            cur.append(i)
        for w in words:
            assert len({sel[i] for i in w}) == 1, f"row {row}: word {w} partly masked"
            multi_token_words += len(w) > 1 and sel[w[0]]
    assert multi_token_words > 100


# ----------------------------------------------------------------------------- next sentence prediction


def make_documents(n_docs: int, seed: int) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Documents of sentences whose tokens are consecutive global ids (so order is checkable)."""
    rng = np.random.default_rng(seed)
    docs, next_id, doc_of = [], 10, []
    for d in range(n_docs):
        segs = []
        for _ in range(rng.integers(1, 9)):
            m = int(rng.integers(2, 20))
            segs.append(np.arange(next_id, next_id + m))
            next_id += m
            doc_of += [d] * m
        docs.append(segs)
    return docs, np.array([-1] * 10 + doc_of)


def test_split_segments():
    toks = np.array([5, 6, 1, 7, 8, 9, 10, 11, 2, 12], dtype=np.uint16)
    segs = split_segments(toks, end_ids=[1, 2], max_len=4)
    assert [s.tolist() for s in segs] == [[5, 6, 1], [7, 8, 9, 10], [11, 2], [12]]
    assert all(s.dtype == np.int64 for s in segs)
    assert split_segments(np.array([], dtype=np.int64), [1], 4) == []


def test_truncate_pair_matches_bert_loop():
    for la in range(0, 12):
        for lb in range(0, 12):
            for m in range(0, 14):
                a, b = list(range(la)), list(range(100, 100 + lb))
                while len(a) + len(b) > m:  # BERT's truncate_seq_pair, trimming A's front and B's back
                    if len(a) > len(b):
                        a.pop(0)
                    else:
                        b.pop()
                ta, tb = truncate_pair(torch.arange(la), torch.arange(100, 100 + lb), m)
                assert (ta.tolist(), tb.tolist()) == (a, b), (la, lb, m)


def test_nsp_pairs_balance_and_true_next_is_consecutive():
    docs, doc_of = make_documents(600, seed=0)
    pairs = list(nsp_pairs(docs, max_tokens=61, seed=1))
    labels = np.array([p[2] for p in pairs])
    assert len(pairs) > 1000
    assert abs(labels.mean() - 0.5) < 0.04
    for a, b, label in pairs:
        assert (np.diff(a) == 1).all()  # A is consecutive text
        if label == 0:
            assert b[0] == a[-1] + 1 and (np.diff(b) == 1).all()
        else:
            assert doc_of[b[0]] != doc_of[a[0]]
    assert [p[0].tolist() for p in pairs[:20]] == [p[0].tolist() for p in nsp_pairs(docs, 61, seed=1)][:20]
    with pytest.raises(ValueError, match="2 non-empty documents"):
        list(nsp_pairs(docs[:1], 61))


def test_nsp_collator_layout_types_and_limits():
    docs, _ = make_documents(300, seed=3)
    pairs = list(nsp_pairs(docs, max_tokens=61, seed=4))[:256]
    v = vocab(size=20_000)
    out = NSPCollator(v, max_len=32, mlm_prob=0.0)(pairs)  # mlm off: raw tokens visible
    ids, types, mask = out["input_ids"], out["token_type_ids"], out["attention_mask"]
    assert ids.shape[1] <= 32 and ids.shape == types.shape == mask.shape
    assert (out["labels"] == IGNORE_INDEX).all()
    assert out["nsp_labels"].tolist() == [p[2] for p in pairs]
    for row in range(len(pairs)):
        n = int(mask[row].sum())
        r, t = ids[row, :n].tolist(), types[row].tolist()
        seps = [i for i, x in enumerate(r) if x == SEP]
        assert r[0] == CLS and len(seps) == 2 and seps[1] == n - 1 and n <= 32
        assert t == [0] * (seps[0] + 1) + [1] * (n - seps[0] - 1) + [0] * (len(t) - n)
        if pairs[row][2] == 0:  # still consecutive across the junction after trimming
            assert r[seps[0] + 1] == r[seps[0] - 1] + 1
    masked = NSPCollator(v, max_len=32, seed=9)(pairs)
    assert (masked["labels"] != IGNORE_INDEX).any()
    assert not ((masked["labels"] != IGNORE_INDEX) & ((ids == CLS) | (ids == SEP) | (mask == 0))).any()


# ----------------------------------------------------------------------------- BART text infilling


def infill_spans(source: list[int], n: int) -> list[int]:
    """Span lengths implied by a corrupted arange(n), where -1 marks the one mask per span."""
    spans, prev = [], -1
    for i, t in enumerate(source):
        if t == -1:
            nxt = next((s for s in source[i + 1:] if s != -1), n)
            spans.append(nxt - prev - 1)
        else:
            prev = t
    return spans


def test_text_infill_statistics():
    g = torch.Generator().manual_seed(0)
    n, spans = 1000, []
    x = torch.arange(N_SPECIAL, N_SPECIAL + n)
    for _ in range(60):
        src = text_infill(x, MASK, ratio=0.3, poisson_lambda=3.0, generator=g)
        kept = src[src != MASK]
        assert (kept.diff() > 0).all()  # order kept, tokens unchanged
        assert not ((src[1:] == MASK) & (src[:-1] == MASK)).any()  # spans never overlap or touch
        s = infill_spans((src - N_SPECIAL).masked_fill(src == MASK, -1).tolist(), n)
        assert sum(s) == n - len(kept) == 300  # exactly 30% masked
        spans += s
    spans = np.array(spans)
    assert abs(spans.mean() - 3.0) < 0.12 and abs(spans.var() - 3.0) < 0.4
    assert abs((spans == 0).mean() - math.exp(-3)) < 0.02  # zero-length spans insert a mask


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_text_infill_tiny_sequences(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(50):
        src = text_infill(torch.arange(10, 10 + n), MASK, generator=g)
        assert 1 <= len(src) and (src == MASK).sum() >= (round(0.3 * n) > 0)


def test_permute_sentences_keeps_sentences():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([10, 11, 1, 12, 1, 13, 14, 15, 1, 16])
    outs = {tuple(permute_sentences(x, [1], g).tolist()) for _ in range(50)}
    sentences = {(10, 11, 1), (12, 1), (13, 14, 15, 1), (16,)}
    assert len(outs) > 5
    for o in outs:
        assert sorted(o) == sorted(x.tolist())
        assert all(any(o[i:i + len(s)] == s for i in range(len(o))) for s in sentences)


def test_bart_collator_labels_are_original():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 80, (32,), generator=g).tolist()
    examples = [torch.randint(N_SPECIAL, 1000, (m,), generator=g) for m in lengths]
    col = DenoisingCollator(vocab(), decoder_start_id=EOS, permute=True, sentence_end_ids=[7, 8], seed=2)
    out = col(examples)
    for row, x in enumerate(examples):
        lab = out["labels"][row]
        assert lab[lab != IGNORE_INDEX].tolist() == [BOS, *x.tolist(), EOS]
        src = out["input_ids"][row][: int(out["attention_mask"][row].sum())].tolist()
        assert src[0] == BOS and src[-1] == EOS and MASK in src
    assert out["decoder_input_ids"][:, 0].eq(EOS).all()
    shifted = out["labels"][:, :-1].masked_fill(out["labels"][:, :-1] < 0, PAD)
    assert torch.equal(out["decoder_input_ids"][:, 1:], shifted)
    again = DenoisingCollator(vocab(), decoder_start_id=EOS, permute=True, sentence_end_ids=[7, 8], seed=2)(examples)
    assert all(torch.equal(out[k], again[k]) for k in out)


# ----------------------------------------------------------------------------- T5 span corruption

SENTINELS = list(range(999, 899, -1))


def t5_merge(inputs: list[int], targets: list[int]) -> list[int]:
    """Fill each sentinel in inputs with the tokens after that sentinel in targets."""
    pieces, cur = {}, None
    for t in targets:
        if t in SENTINELS:
            cur = t
            pieces[cur] = []
        else:
            pieces[cur].append(t)
    return [x for t in inputs for x in (pieces[t] if t in SENTINELS else [t])]


def test_span_corrupt_reconstructs_and_counts():
    g = torch.Generator().manual_seed(0)
    lengths = []
    for n in [*range(1, 40), *([200] * 100)]:
        x = torch.arange(10, 10 + n)
        inp, tgt = span_corrupt(x, SENTINELS, generator=g)
        assert t5_merge(inp.tolist(), tgt.tolist()) == x.tolist()
        noise = min(max(round(0.15 * n), 1), n - 1)
        spans = [t for t in inp.tolist() if t in SENTINELS]
        assert spans == SENTINELS[: len(spans)] and tgt[-1].item() == SENTINELS[len(spans)]
        assert len(tgt) - len(spans) - 1 == noise
        if n == 200:
            assert len(spans) == round(noise / 3)
            assert inp[0].item() not in SENTINELS  # a non-noise span comes first, as in T5
            lengths.append(noise / len(spans))
    assert abs(np.mean(lengths) - 3.0) < 0.05
    with pytest.raises(ValueError, match="sentinel"):
        span_corrupt(torch.arange(10, 210), SENTINELS[:5], generator=g)


def test_t5_collator():
    examples = [list(range(10, 60)), list(range(10, 20))]
    out = DenoisingCollator(vocab(), decoder_start_id=PAD, mode="t5", sentinel_ids=SENTINELS, seed=0)(examples)
    for row, x in enumerate(examples):
        inp = out["input_ids"][row][: int(out["attention_mask"][row].sum())].tolist()
        lab = [t for t in out["labels"][row].tolist() if t != IGNORE_INDEX]
        assert inp[-1] == EOS and lab[-1] == EOS
        assert t5_merge(inp[:-1], lab[:-1]) == x
    assert out["decoder_input_ids"][:, 0].eq(PAD).all()
    with pytest.raises(ValueError, match="sentinel_ids"):
        DenoisingCollator(vocab(), decoder_start_id=PAD, mode="t5")
