"""Pretraining collators: causal LM, masked LM (+ whole-word), next sentence prediction,
BART text infilling and T5 span corruption.

Token ids go in (lists, numpy arrays or tensors), dicts of int64 CPU tensors come out.
Randomness comes from one `torch.Generator` per collator, seeded explicitly, so a batch is
a pure function of (seed, call order). Labels are already aligned with the logits the model
produces at the same position (causal LM labels are shifted here), and -100 marks the
positions a loss must ignore. The tokenizer facts a collator needs live in `VocabInfo`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from lmforge.data.batching import IGNORE_INDEX, TokenSeq, as_ids, pad_batch
from lmforge.models.encdec import shift_right

Pair = tuple[TokenSeq, TokenSeq, int]


@dataclass(frozen=True, eq=False)
class VocabInfo:
    """What the collators need to know about a tokenizer.

    vocab_size: the tokenizer's vocabulary size (not the model's padded one); random
        replacement tokens are drawn below it.
    pad_id, mask_id, cls_id, sep_id, bos_id, eos_id: ids of those tokens (None when absent).
    special_ids: further ids that are never masked nor drawn as random tokens; the named ids
        above are added automatically.
    continues_word: (V,) bool, True where a token continues the previous token's word (see
        `word_continuation_table`); needed only for whole-word masking.
    """

    vocab_size: int
    pad_id: int
    mask_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    special_ids: tuple[int, ...] = ()
    continues_word: Tensor | None = None

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"VocabInfo.vocab_size must be positive, got {self.vocab_size}")
        named = {"pad_id": self.pad_id, "mask_id": self.mask_id, "cls_id": self.cls_id, "sep_id": self.sep_id,
                 "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, i in [*named.items(), *(("special_ids", i) for i in self.special_ids)]:
            if i is not None and not 0 <= i < self.vocab_size:
                raise ValueError(f"VocabInfo.{name}: id {i} is outside [0, {self.vocab_size})")
        if self.continues_word is not None and tuple(self.continues_word.shape) != (self.vocab_size,):
            raise ValueError(f"VocabInfo.continues_word must have shape ({self.vocab_size},), "
                             f"got {tuple(self.continues_word.shape)}")
        special = torch.zeros(self.vocab_size, dtype=torch.bool)
        special[[i for i in (*named.values(), *self.special_ids) if i is not None]] = True
        if bool(special.all()):
            raise ValueError("VocabInfo: every id is special, nothing can be masked or drawn")
        # Cached derived tables (the dataclass is frozen, hence object.__setattr__).
        object.__setattr__(self, "special_table", special)
        object.__setattr__(self, "normal_ids", torch.nonzero(~special).squeeze(1))

    def require(self, *names: str) -> None:
        """Raise ValueError naming the first of `names` (e.g. "mask_id") that is None."""
        for name in names:
            if getattr(self, name) is None:
                raise ValueError(f"VocabInfo.{name} is required by this collator")


class TokenizerLike(Protocol):
    """The three tokenizer facts `word_continuation_table` reads."""

    vocab_size: int
    special_ids: Sequence[int]

    def id_to_token(self, i: int) -> str | None: ...


def word_continuation_table(tokenizer: TokenizerLike, scheme: str = "auto") -> Tensor:
    """(V,) bool table: True where token i continues the word of the token before it.

    scheme "wordpiece": tokens starting with "##" continue; "bytelevel" (GPT-2/RoBERTa BPE):
    tokens not starting with "Ġ" continue; "metaspace" (SentencePiece): tokens not starting
    with "▁" continue. "auto" picks the first scheme whose marker occurs in the vocabulary.
    Special tokens never continue a word.
    """
    size = int(tokenizer.vocab_size)
    tokens = [tokenizer.id_to_token(i) or "" for i in range(size)]
    if scheme == "auto":
        for name, marker in (("wordpiece", "##"), ("bytelevel", "Ġ"), ("metaspace", "▁")):
            if any(t.startswith(marker) and len(t) > len(marker) for t in tokens):
                scheme = name
                break
        else:
            raise ValueError("word_continuation_table: no '##', 'Ġ' or '▁' word markers in the vocabulary; "
                             "pass scheme= explicitly")
    if scheme == "wordpiece":
        table = [t.startswith("##") for t in tokens]
    elif scheme in ("bytelevel", "metaspace"):
        marker = "Ġ" if scheme == "bytelevel" else "▁"
        table = [bool(t) and not t.startswith(marker) for t in tokens]
    else:
        raise ValueError(f"word_continuation_table: unknown scheme {scheme!r}")
    out = torch.tensor(table, dtype=torch.bool)
    out[[i for i in tokenizer.special_ids if 0 <= i < size]] = False
    return out


# ----------------------------------------------------------------------------- shared pieces


def _check_range(ids: Tensor, vocab: VocabInfo) -> None:
    # CPU tensors in a collator: this check costs no device sync.
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab.vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab.vocab_size}), got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")


class _SeededCollator:
    """Owns the torch.Generator. In a DataLoader worker (which holds a copy of the collator) it
    is reseeded from the collator seed and the worker's seed: DataLoader draws those afresh each
    epoch from its own generator, so workers and epochs differ and a seeded loader reproduces."""

    def __init__(self, seed: int | None, generator: torch.Generator | None) -> None:
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(0 if seed is None else seed)
        self.generator = generator
        self._base_seed = generator.initial_seed()
        self._worker_seed: int | None = None

    def _gen(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.generator.manual_seed((self._base_seed * 1_000_003 + info.seed) % 2**63)
        return self.generator

    def state_dict(self) -> dict[str, Any]:
        """RNG state for resumable training."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------- causal LM


def clm_windows(windows: Tensor | Sequence[TokenSeq]) -> dict[str, Tensor]:
    """Fixed windows (B, T+1) -> input_ids = w[:, :-1], labels = w[:, 1:], both (B, T).

    No attention_mask: every position is real, so attention can take the is_causal fast path.
    """
    if not isinstance(windows, Tensor):
        rows = [as_ids(s) for s in windows]
        if len({len(r) for r in rows}) > 1:
            raise ValueError("clm_windows: windows differ in length; give a pad_id to pad variable-length sequences")
        windows = torch.stack(rows)
    w = windows.to(torch.int64)
    if w.dim() != 2 or w.shape[1] < 2:
        raise ValueError(f"clm_windows expects (B, T+1) with T >= 1, got shape {tuple(w.shape)}")
    return {"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}


def clm_pad(seqs: Sequence[TokenSeq], pad_id: int, max_len: int | None = None) -> dict[str, Tensor]:
    """Variable-length sequences -> right-padded input_ids, attention_mask, labels, each (B, L).

    A sequence of n tokens (truncated to max_len + 1) gives n - 1 positions: input t predicts t+1.
    Padding positions have attention_mask 0 and label -100.
    """
    ids, mask = pad_batch(seqs, pad_id, None if max_len is None else max_len + 1)
    if int(mask.sum(1).min()) < 2:  # host sync on CPU data only
        raise ValueError("clm_pad: every sequence needs at least 2 tokens")
    valid = mask[:, 1:]  # position t is real iff token t+1 exists; the last token is only a target
    return {"input_ids": ids[:, :-1].masked_fill(valid == 0, pad_id), "attention_mask": valid.contiguous(),
            "labels": ids[:, 1:].masked_fill(valid == 0, IGNORE_INDEX)}


class CausalLMCollator:
    """collate_fn for causal LM: equal-length windows when pad_id is None, else padding."""

    def __init__(self, pad_id: int | None = None, max_len: int | None = None) -> None:
        self.pad_id, self.max_len = pad_id, max_len

    def __call__(self, examples: Sequence[TokenSeq]) -> dict[str, Tensor]:
        if self.pad_id is None:
            return clm_windows([as_ids(e)[: None if self.max_len is None else self.max_len + 1] for e in examples])
        return clm_pad(examples, self.pad_id, self.max_len)


# ----------------------------------------------------------------------------- masked LM


def _select_tokens(eligible: Tensor, k: Tensor, gen: torch.Generator) -> Tensor:
    """Exactly k[b] eligible positions per row, uniformly at random. (B, T) bool."""
    # Ineligible positions score 2 > any uniform draw, so they sort last and k <= n_eligible never reaches them.
    scores = torch.rand(eligible.shape, generator=gen).masked_fill(~eligible, 2.0)
    order = scores.argsort(dim=1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(eligible.shape[1]).expand_as(order).contiguous())
    return ranks < k[:, None]


def _select_words(ids: Tensor, eligible: Tensor, k: Tensor, continues: Tensor, gen: torch.Generator) -> Tensor:
    """Random whole words per row until about k[b] tokens are covered. (B, T) bool.

    Words are taken in random order while (tokens before the word + half the word) < k: this
    midpoint rule (ties by a coin) keeps the expected number of masked tokens near k instead of
    always over- or under-shooting by a partial word.
    """
    prev_eligible = torch.cat([torch.zeros_like(eligible[:, :1]), eligible[:, :-1]], dim=1)
    starts = eligible & ~(continues[ids] & prev_eligible)  # a continuation after [CLS]/padding starts a word
    word = (starts.long().cumsum(1) - 1).clamp(min=0)  # (B, T) word index of each token
    lengths = torch.zeros_like(ids).scatter_add_(1, word, eligible.long())  # (B, W=T) tokens per word
    scores = torch.rand(lengths.shape, generator=gen).masked_fill(lengths == 0, 2.0)
    order = scores.argsort(dim=1)
    sorted_len = lengths.gather(1, order)
    inclusive = sorted_len.cumsum(1)
    mid, target = 2 * inclusive - sorted_len, 2 * k[:, None]  # doubled to stay in integers
    tie_wins = torch.rand(target.shape, generator=gen) < 0.5  # a word centred exactly on k: a coin flip, no bias
    chosen_sorted = ((mid < target) | ((mid == target) & tie_wins)) & (sorted_len > 0)
    chosen = torch.zeros_like(chosen_sorted).scatter_(1, order, chosen_sorted)
    return chosen.gather(1, word) & eligible


def mask_tokens(
    input_ids: Tensor,
    vocab: VocabInfo,
    *,
    attention_mask: Tensor | None = None,
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    whole_word: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking of a padded batch (B, T) -> (masked input_ids, labels), both (B, T).

    Per row, k = prob * n tokens are selected among the n non-special, non-padding ones (k is
    stochastically rounded, so the expected fraction is exactly `prob`); of those, mask_frac
    become [MASK], random_frac a random non-special token, the rest stay. labels hold the
    original id at selected positions and -100 elsewhere. whole_word selects whole words
    (vocab.continues_word) so all sub-tokens of a word are predicted together.
    """
    vocab.require("mask_id")
    if not 0.0 <= prob <= 1.0 or mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1:
        raise ValueError(f"mask_tokens: bad proportions prob={prob}, mask_frac={mask_frac}, random_frac={random_frac}")
    if whole_word and vocab.continues_word is None:
        raise ValueError("whole-word masking needs VocabInfo.continues_word (see word_continuation_table)")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    ids = input_ids.to(torch.int64)
    _check_range(ids, vocab)
    eligible = ~vocab.special_table[ids]
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    n = eligible.sum(1)
    k = torch.minimum((n * prob + torch.rand(n.shape, generator=gen, dtype=torch.float64)).floor().long(), n)
    if whole_word:
        selected = _select_words(ids, eligible, k, vocab.continues_word, gen)
    else:
        selected = _select_tokens(eligible, k, gen)
    labels = ids.masked_fill(~selected, IGNORE_INDEX)
    u = torch.rand(ids.shape, generator=gen)
    random_ids = vocab.normal_ids[torch.randint(len(vocab.normal_ids), ids.shape, generator=gen)]
    out = torch.where(selected & (u < mask_frac), vocab.mask_id, ids)
    out = torch.where(selected & (u >= mask_frac) & (u < mask_frac + random_frac), random_ids, out)
    return out, labels


class MLMCollator(_SeededCollator):
    """collate_fn for masked LM: examples are token sequences, or dicts with "input_ids" and
    optionally "token_type_ids". Output: input_ids, attention_mask, labels [, token_type_ids], (B, L)."""

    def __init__(self, vocab: VocabInfo, *, prob: float = 0.15, whole_word: bool = False,
                 max_len: int | None = None, seed: int | None = 0, generator: torch.Generator | None = None) -> None:
        super().__init__(seed, generator)
        vocab.require("mask_id")
        self.vocab, self.prob, self.whole_word, self.max_len = vocab, prob, whole_word, max_len

    def __call__(self, examples: Sequence[TokenSeq | dict[str, TokenSeq]]) -> dict[str, Tensor]:
        dicts = [e if isinstance(e, dict) else {"input_ids": e} for e in examples]
        ids, mask = pad_batch([d["input_ids"] for d in dicts], self.vocab.pad_id, self.max_len)
        masked, labels = mask_tokens(ids, self.vocab, attention_mask=mask, prob=self.prob,
                                     whole_word=self.whole_word, generator=self._gen())
        out = {"input_ids": masked, "attention_mask": mask, "labels": labels}
        if "token_type_ids" in dicts[0]:
            out["token_type_ids"] = pad_batch([d["token_type_ids"] for d in dicts], 0, self.max_len)[0]
        return out


# ----------------------------------------------------------------------------- next sentence prediction


def split_segments(tokens: TokenSeq, end_ids: Sequence[int], max_len: int) -> list[np.ndarray]:
    """Split a document's tokens after every sentence-final id (e.g. ".", "!", "?") into int64
    arrays of at most max_len tokens (longer sentences are cut into max_len chunks)."""
    if max_len < 1:
        raise ValueError(f"split_segments: max_len must be >= 1, got {max_len}")
    arr = np.asarray(tokens).astype(np.int64)
    cuts = np.flatnonzero(np.isin(arr, np.asarray(end_ids, dtype=np.int64))) + 1
    return [piece[i:i + max_len] for piece in np.split(arr, cuts) for i in range(0, len(piece), max_len)]


def nsp_pairs(documents: Sequence[Sequence[TokenSeq]], max_tokens: int, *, seed: int = 0,
              short_seq_prob: float = 0.1) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """BERT's sentence-pair sampling: yields (A, B, label), label 0 = IsNext, 1 = NotNext.

    Each document (a list of segments, e.g. sentences) is walked in order; segments gather into
    a chunk of about max_tokens (the A+B budget, i.e. max_len - 3), sometimes shorter
    (short_seq_prob). A is the first part of the chunk; with probability 1/2 B is the rest
    (the true continuation), else B is drawn from a random other document and the unused
    segments go back to the stream. A one-segment chunk is split inside its segment so IsNext
    stays possible and the labels stay balanced. Caller shuffles the examples.
    """
    rng = random.Random(seed)
    docs = [[np.asarray(s, dtype=np.int64) for s in d if len(s) > 0] for d in documents]
    docs = [d for d in docs if d]
    if len(docs) < 2:
        raise ValueError("nsp_pairs needs at least 2 non-empty documents (NotNext samples come from another one)")
    if max_tokens < 2:
        raise ValueError(f"nsp_pairs: max_tokens must be >= 2, got {max_tokens}")
    for d, doc in enumerate(docs):
        target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
        chunk: list[np.ndarray] = []
        size, i = 0, 0
        while i < len(doc):
            chunk.append(doc[i])
            size += len(doc[i])
            if i == len(doc) - 1 or size >= target:
                split_inside = len(chunk) == 1 and len(chunk[0]) >= 2
                if split_inside:
                    cut = rng.randint(1, len(chunk[0]) - 1)
                    chunk = [chunk[0][:cut], chunk[0][cut:]]
                a_end = rng.randint(1, len(chunk) - 1) if len(chunk) > 1 else 1
                a = np.concatenate(chunk[:a_end])
                if len(chunk) == 1 or rng.random() < 0.5:
                    other = docs[(d + 1 + rng.randrange(len(docs) - 1)) % len(docs)]
                    start = rng.randrange(len(other))
                    b_parts, b_len = [], 0
                    for seg in other[start:]:
                        b_parts.append(seg)
                        b_len += len(seg)
                        if b_len >= max(1, target - len(a)):
                            break
                    if not split_inside:  # whole unused segments go back to the stream (a split one is dropped)
                        i -= len(chunk) - a_end
                    yield a, np.concatenate(b_parts), 1
                else:
                    yield a, np.concatenate(chunk[a_end:]), 0
                chunk, size = [], 0
            i += 1


def truncate_pair(a: Tensor, b: Tensor, max_tokens: int) -> tuple[Tensor, Tensor]:
    """Trim the longer side until len(a) + len(b) <= max_tokens (ties trim b), like BERT; A loses
    tokens at its start and B at its end, so an IsNext pair stays contiguous at the A|B junction."""
    la, lb = len(a), len(b)
    if la + lb <= max_tokens:
        return a, b
    short = min(la, lb)
    if short <= max_tokens - short:
        la, lb = (max_tokens - lb, lb) if la > lb else (la, max_tokens - la)
    else:
        la, lb = (max_tokens + 1) // 2, max_tokens // 2
    return a[len(a) - la:], b[:lb]


class NSPCollator(_SeededCollator):
    """collate_fn for BERT pretraining (MLM + NSP) over (A, B, label) pairs from `nsp_pairs`.

    Builds [CLS] A [SEP] B [SEP] (trimmed to max_len), token_type_ids 0 for [CLS] A [SEP] and 1
    for B [SEP], right-pads, and masks tokens. Output, each (B, L) except nsp_labels (B,):
    input_ids, token_type_ids, attention_mask, labels (MLM; all -100 when mlm_prob=0), nsp_labels.
    """

    def __init__(self, vocab: VocabInfo, *, max_len: int = 512, mlm_prob: float = 0.15, whole_word: bool = False,
                 seed: int | None = 0, generator: torch.Generator | None = None) -> None:
        super().__init__(seed, generator)
        vocab.require("cls_id", "sep_id", "mask_id")
        if max_len < 5:
            raise ValueError(f"NSPCollator: max_len must be >= 5, got {max_len}")
        self.vocab, self.max_len, self.mlm_prob, self.whole_word = vocab, max_len, mlm_prob, whole_word

    def __call__(self, pairs: Sequence[Pair]) -> dict[str, Tensor]:
        cls, sep = torch.tensor([self.vocab.cls_id]), torch.tensor([self.vocab.sep_id])
        seqs, types = [], []
        for a, b, _ in pairs:
            a, b = truncate_pair(as_ids(a), as_ids(b), self.max_len - 3)
            seqs.append(torch.cat([cls, a, sep, b, sep]))
            types.append(torch.tensor([0] * (len(a) + 2) + [1] * (len(b) + 1)))
        ids, mask = pad_batch(seqs, self.vocab.pad_id)
        masked, labels = mask_tokens(ids, self.vocab, attention_mask=mask, prob=self.mlm_prob,
                                     whole_word=self.whole_word, generator=self._gen())
        return {"input_ids": masked, "token_type_ids": pad_batch(types, 0)[0], "attention_mask": mask,
                "labels": labels, "nsp_labels": torch.tensor([int(p[2]) for p in pairs], dtype=torch.int64)}


# ----------------------------------------------------------------------------- denoising (BART, T5)


def permute_sentences(tokens: Tensor, end_ids: Sequence[int], generator: torch.Generator) -> Tensor:
    """Shuffle the sentences of a 1-D sequence (split after each id in end_ids)."""
    ends = torch.isin(tokens, torch.as_tensor(list(end_ids), dtype=torch.int64)).nonzero().squeeze(1) + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), ends[ends < len(tokens)], torch.tensor([len(tokens)])])
    pieces = [tokens[s:e] for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    return torch.cat([pieces[i] for i in torch.randperm(len(pieces), generator=generator).tolist()])


def _span_lengths(budget: int, lam: float, gen: torch.Generator) -> Tensor:
    """Poisson(lam) span lengths summing exactly to budget (the last one trimmed, as in BART)."""
    lengths = torch.zeros(0, dtype=torch.int64)
    while int(lengths.sum()) < budget:
        draw = torch.poisson(torch.full((budget,), float(lam)), generator=gen).long()
        lengths = torch.cat([lengths, draw])
    cum = lengths.cumsum(0)
    last = int(torch.searchsorted(cum, budget))  # first span reaching the budget
    lengths = lengths[: last + 1].clone()
    lengths[last] = budget - (int(cum[last - 1]) if last > 0 else 0)
    return lengths


def text_infill(tokens: Tensor, mask_id: int, *, ratio: float = 0.3, poisson_lambda: float = 3.0,
                generator: torch.Generator) -> Tensor:
    """BART text infilling of a 1-D sequence -> corrupted 1-D sequence.

    round(ratio * n) tokens are covered by spans with Poisson(lambda) lengths; each span,
    including zero-length ones (pure insertions), becomes ONE mask token. Spans are placed in
    distinct gaps between the kept tokens, so they never overlap: the masked fraction is exact
    and the span lengths keep their distribution.
    """
    budget = round(ratio * len(tokens))
    if budget == 0:
        return tokens.clone()
    n = len(tokens)
    lengths = _span_lengths(budget, poisson_lambda, generator)
    kept = n - int(lengths.sum())
    if len(lengths) > kept + 1:  # tiny sequences: more spans than gaps, fold the surplus into the last span
        lengths = torch.cat([lengths[:kept], lengths[kept:].sum(0, keepdim=True)])
    k = len(lengths)
    gaps = torch.randperm(kept + 1, generator=generator)[:k].sort().values  # span j sits before kept token gaps[j]
    starts = gaps + lengths.cumsum(0) - lengths  # span starts in the original sequence
    delta = torch.zeros(n + 1, dtype=torch.int64)
    delta.index_add_(0, starts, torch.ones(k, dtype=torch.int64))
    delta.index_add_(0, starts + lengths, -torch.ones(k, dtype=torch.int64))
    masked = delta.cumsum(0)[:n] > 0  # (n,) original positions covered by a span
    out = torch.full((kept + k,), mask_id, dtype=torch.int64)
    is_mask = torch.zeros(kept + k, dtype=torch.bool)
    is_mask[gaps + torch.arange(k)] = True
    out[~is_mask] = tokens[~masked]
    return out


def _random_partition(total: int, parts: int, gen: torch.Generator) -> Tensor:
    """`total` items split into `parts` non-empty segments, uniformly over compositions. (parts,)"""
    cuts = (torch.randperm(total - 1, generator=gen)[: parts - 1] + 1).sort().values
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([total])])
    return bounds.diff()


def _spans_to_sentinels(tokens: Tensor, spans: Tensor, sentinels: Tensor) -> Tensor:
    """Replace the j-th run of True in `spans` (n,) by sentinels[j] and drop the rest of the run."""
    start = spans & ~torch.cat([torch.tensor([False]), spans[:-1]])
    span_id = (start.long().cumsum(0) - 1).clamp(min=0)
    return torch.where(start, sentinels[span_id], tokens)[~spans | start]


def span_corrupt(tokens: Tensor, sentinel_ids: Sequence[int], *, density: float = 0.15, mean_span: float = 3.0,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """T5 span corruption of a 1-D sequence -> (inputs, targets), both 1-D, without eos.

    round(density * n) noise tokens in round(noise / mean_span) spans, alternating with
    non-noise spans (non-noise first, as in T5). inputs: non-noise tokens with noise span j
    replaced by sentinel_ids[j]; targets: sentinel_ids[j] + span j for each span, then the
    next sentinel as terminator (as in the T5 paper's example).
    """
    n = len(tokens)
    noise = min(max(round(density * n), 1), n - 1)
    spans = min(max(round(noise / mean_span), 1), noise, n - noise) if noise > 0 else 0
    if len(sentinel_ids) < spans + 1:
        raise ValueError(f"span_corrupt: {spans} spans need {spans + 1} sentinel ids, got {len(sentinel_ids)}")
    sentinels = torch.as_tensor(list(sentinel_ids[: spans + 1]), dtype=torch.int64)
    if spans == 0:
        return tokens.clone(), sentinels[:1]
    lens = torch.stack([_random_partition(n - noise, spans, generator), _random_partition(noise, spans, generator)], 1)
    is_noise = torch.tensor([False, True]).repeat(spans).repeat_interleave(lens.reshape(-1))  # (n,)
    inputs = _spans_to_sentinels(tokens, is_noise, sentinels)
    # Non-noise span j precedes noise span j, so replacing the non-noise spans gives s_j + span j.
    targets = torch.cat([_spans_to_sentinels(tokens, ~is_noise, sentinels), sentinels[spans:]])
    return inputs, targets


class DenoisingCollator(_SeededCollator):
    """collate_fn for encoder-decoder denoising: mode "bart" (text infilling, optional sentence
    permutation) or "t5" (span corruption with sentinel_ids).

    Each example is a token sequence without special tokens (truncated to max_len - 2). bart:
    labels = [bos] x [eos], source = [bos] infill(permute(x)) [eos] (bos/eos when set in vocab).
    t5: labels = targets [eos], source = inputs [eos]. Output, each (B, L): input_ids,
    attention_mask, labels (-100 padded), decoder_input_ids (labels shifted right behind
    decoder_start_id).
    """

    def __init__(self, vocab: VocabInfo, *, decoder_start_id: int, mode: str = "bart", ratio: float = 0.3,
                 poisson_lambda: float = 3.0, sentence_end_ids: Sequence[int] = (), permute: bool = False,
                 sentinel_ids: Sequence[int] = (), density: float = 0.15, mean_span: float = 3.0,
                 max_len: int | None = None, seed: int | None = 0, generator: torch.Generator | None = None) -> None:
        super().__init__(seed, generator)
        if mode not in ("bart", "t5"):
            raise ValueError(f"DenoisingCollator: mode must be 'bart' or 't5', got {mode!r}")
        if mode == "bart":
            vocab.require("mask_id")
        if mode == "t5" and not sentinel_ids:
            raise ValueError("DenoisingCollator: mode 't5' needs sentinel_ids")
        if permute and not sentence_end_ids:
            raise ValueError("DenoisingCollator: permute=True needs sentence_end_ids")
        self.vocab, self.decoder_start_id, self.mode, self.max_len = vocab, decoder_start_id, mode, max_len
        self.ratio, self.poisson_lambda, self.permute = ratio, poisson_lambda, permute
        self.sentence_end_ids = sentence_end_ids
        self.sentinel_ids, self.density, self.mean_span = sentinel_ids, density, mean_span

    def _wrap(self, x: Tensor, bos: bool) -> Tensor:
        v = self.vocab
        head = [v.bos_id] if bos and v.bos_id is not None else []
        tail = [v.eos_id] if v.eos_id is not None else []
        return torch.cat([torch.tensor(head, dtype=torch.int64), x, torch.tensor(tail, dtype=torch.int64)])

    def __call__(self, examples: Sequence[TokenSeq]) -> dict[str, Tensor]:
        gen = self._gen()
        sources, targets = [], []
        for e in examples:
            x = as_ids(e)[: None if self.max_len is None else self.max_len - 2]
            if self.mode == "bart":
                y = permute_sentences(x, self.sentence_end_ids, gen) if self.permute else x
                src = text_infill(y, self.vocab.mask_id, ratio=self.ratio,
                                  poisson_lambda=self.poisson_lambda, generator=gen)
                sources.append(self._wrap(src, bos=True))
                targets.append(self._wrap(x, bos=True))
            else:
                src, tgt = span_corrupt(x, self.sentinel_ids, density=self.density, mean_span=self.mean_span,
                                        generator=gen)
                sources.append(self._wrap(src, bos=False))
                targets.append(self._wrap(tgt, bos=False))
        ids, mask = pad_batch(sources, self.vocab.pad_id)
        labels = pad_batch(targets, IGNORE_INDEX)[0]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "decoder_input_ids": shift_right(labels, self.vocab.pad_id, self.decoder_start_id)}
