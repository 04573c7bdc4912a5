"""Pretraining batches for each objective, from prepared token shards or synthetic tokens.

    clm        RandomWindows over the shards (lmforge.data.loaders); validation: SequentialWindows
    mlm        documents -> [CLS] piece [SEP] -> MLMCollator
    mlm+nsp    documents -> sentences -> nsp_pairs -> NSPCollator
    denoise    documents -> pieces -> DenoisingCollator (BART infilling or T5 span corruption)

The document objectives read documents in pools (`PooledExamples`): a pool of documents
becomes a shuffled list of examples, which is cut into batches. A pool is a pure function
of where it starts in the document stream and its index, so the resumable state is
(stream position at the pool's start, pool index, examples used, collator RNG).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.config import RunConfig
from lmforge.data.batching import BatchIterator
from lmforge.data.collators import (
    DenoisingCollator,
    MLMCollator,
    NSPCollator,
    VocabInfo,
    clm_windows,
    nsp_pairs,
    split_segments,
    word_continuation_table,
)
from lmforge.data.loaders import Documents, PooledExamples, RandomWindows, SequentialWindows, same_position
from lmforge.data.prepare import prepare_corpus
from lmforge.data.shards import META_FILE, TokenShards
from lmforge.dist import parallel
from lmforge.dist.parallel import DistEnv
from lmforge.tokenizer import Tokenizer

SENTENCE_ENDS = (".", "!", "?", "Ġ.", "▁.")  # sentence-final tokens, as the common tokenizers spell them


@dataclass
class PretrainData:
    """What a data builder hands to `pretrain`.

    train: this process's training batches; val: re-iterable validation batches or None;
    model_overrides: model fields the data decides (vocab_size, pad_token_id,
    decoder_start_token_id); save_extra: writes files the data owns (the tokenizer) into
    each checkpoint directory; tokenizer: saved with the final model.
    """

    train: BatchIterator
    val: Iterable[dict[str, Tensor]] | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    save_extra: Callable[[Path], None] | None = None
    tokenizer: Tokenizer | None = None


DataBuilder = Callable[[RunConfig, DistEnv], PretrainData]


# ----------------------------------------------------------------------------- examples per objective


def _pieces(docs: list[np.ndarray], length: int) -> list[np.ndarray]:
    return [d[i:i + length] for d in docs for i in range(0, len(d), length)]


def _vocab_info(tok: Tokenizer, whole_word: bool) -> VocabInfo:
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if pad is None:
        raise ValueError("data.tokenizer has neither a pad nor an eos token to pad batches with")
    return VocabInfo(tok.vocab_size, pad_id=pad, mask_id=tok.mask_id,
                     cls_id=tok.cls_id if tok.cls_id is not None else tok.bos_id,
                     sep_id=tok.sep_id if tok.sep_id is not None else tok.eos_id, bos_id=tok.bos_id,
                     eos_id=tok.eos_id, special_ids=tuple(sorted(tok.special_ids)),
                     continues_word=word_continuation_table(tok) if whole_word else None)


def _sentence_end_ids(tok: Tokenizer) -> list[int]:
    return sorted({i for t in SENTENCE_ENDS if (i := tok.token_to_id(t)) is not None})


def _document_objective(config: RunConfig, tok: Tokenizer, vocab: VocabInfo, seed: int) -> tuple[Callable, Any]:
    """(make_examples, collator) for mlm, mlm+nsp or denoise."""
    d, objective = config.data, config.train.objective
    T = d.seq_len
    if objective == "mlm":
        vocab.require("mask_id", "cls_id", "sep_id")
        cls, sep = np.array([vocab.cls_id]), np.array([vocab.sep_id])
        collator = MLMCollator(vocab, prob=d.mlm_probability, whole_word=d.whole_word_mask, max_len=T, seed=seed)
        return (lambda docs, s: [np.concatenate([cls, p, sep]) for p in _pieces(docs, T - 2)]), collator
    if objective == "mlm+nsp":
        ends = _sentence_end_ids(tok)
        collator = NSPCollator(vocab, max_len=T, mlm_prob=d.mlm_probability, whole_word=d.whole_word_mask, seed=seed)

        def pairs(docs: list[np.ndarray], s: int) -> list:
            if len(docs) < 2:
                return []
            return list(nsp_pairs([split_segments(doc, ends, T - 3) for doc in docs], T - 3, seed=s))
        return pairs, collator
    start = vocab.eos_id if vocab.eos_id is not None else vocab.pad_id
    collator = DenoisingCollator(vocab, decoder_start_id=start, mode=d.denoise_mode, ratio=d.noise_ratio,
                                 poisson_lambda=d.mean_span_length, sentence_end_ids=_sentence_end_ids(tok),
                                 permute=d.permute_sentences, density=d.noise_ratio, mean_span=d.mean_span_length,
                                 sentinel_ids=_sentinels(tok) if d.denoise_mode == "t5" else (), max_len=T,
                                 seed=seed)
    return (lambda docs, s: _pieces(docs, T - 2)), collator


def _sentinels(tok: Tokenizer) -> list[int]:
    ids = [tok.token_to_id(f"<extra_id_{i}>") for i in range(100)]
    ids = [i for i in ids if i is not None]
    if not ids:
        raise ValueError("data.denoise_mode t5 needs sentinel tokens <extra_id_0>, <extra_id_1>, ... in the tokenizer")
    return ids


def _equal_length(batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Trim to the shortest list over processes: evaluation runs collectives per batch."""
    return batches[:min(parallel.gather_objects(len(batches)))]


# ----------------------------------------------------------------------------- builders


def prepares_into_run(config: RunConfig) -> bool:
    """Will `prepared_data` tokenize raw text into out_dir/data (rather than read prepared shards)?"""
    d = config.data
    return not d.synthetic and any(s is not None and not (Path(s) / META_FILE).is_file() for s in (d.train, d.val))


def _prepared(source: str, tok: Tokenizer | None, target: Path, val_fraction: float, env: DistEnv) -> str:
    """`source` itself when it is a prepared directory; else raw text files (paths, a directory or
    a glob) tokenized into `target` by rank 0 (idempotent: an identical preparation is reused)."""
    if (Path(source) / META_FILE).is_file():
        return source
    if tok is None:
        raise ValueError(f"{source}: raw text needs data.tokenizer (train one with `lmforge tokenizer train`), "
                         "or prepare it first with `lmforge data prepare`")
    if env.is_main:
        stats = prepare_corpus(tok, source, target, val_fraction=val_fraction)
        if not stats["skipped"]:
            print(f"prepared {source} -> {target}: {stats['n_tokens']:,} tokens in {stats['seconds']:.1f}s")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return str(target)


def prepared_data(config: RunConfig, env: DistEnv) -> PretrainData:
    """Batches from a directory written by `lmforge data prepare` (config.data.train; its
    validation split, or config.data.val's, for evaluation)."""
    d, t = config.data, config.train
    if d.train is None:
        raise ValueError("data.train is required: a directory written by `lmforge data prepare` "
                         "(or set data.synthetic=true to measure speed on random tokens)")
    tok = Tokenizer.from_pretrained(d.tokenizer) if d.tokenizer else None
    train_dir = _prepared(d.train, tok, Path(t.out_dir) / "data" / "train", 0.005, env)
    val_dir = _prepared(d.val, tok, Path(t.out_dir) / "data" / "val", 0.0, env) if d.val else None
    shards = TokenShards(train_dir, "train")
    if tok is not None:
        shards.check_tokenizer(tok)
    elif t.objective != "clm":
        raise ValueError(f"data.tokenizer is required for train.objective {t.objective!r} (mask, [CLS], [SEP] ids)")
    # data.val: a separately prepared directory, all of it validation; else data.train's own split.
    val_shards = TokenShards(val_dir, "train") if val_dir else TokenShards(train_dir, "validation")
    # Windows (clm) need one sequence's worth of tokens; document objectives (NSP) need 2+ documents.
    has_val = val_shards.n_tokens > d.seq_len + 1 and (t.objective == "clm" or val_shards.n_docs >= 2)
    max_val = config.eval.steps
    overrides: dict[str, Any] = {"vocab_size": shards.vocab_size}
    save_extra = tok.save if tok is not None else None
    rank, world, B = env.rank, env.world_size, t.micro_batch_size
    if t.objective == "clm":
        train = RandomWindows(shards, B, d.seq_len, seed=d.seed, rank=rank, world_size=world)
        val = SequentialWindows(val_shards, B, d.seq_len, rank=rank, world_size=world,
                                max_batches=max_val) if has_val else None
        return PretrainData(train, val, overrides, save_extra, tok)
    vocab = _vocab_info(tok, d.whole_word_mask)
    overrides["pad_token_id"] = vocab.pad_id
    make, collate = _document_objective(config, tok, vocab, seed=d.seed * 1000 + rank)
    if t.objective == "denoise":
        overrides["decoder_start_token_id"] = collate.decoder_start_id
    docs = Documents(shards, shuffle=True, seed=d.seed, rank=rank, world_size=world, epochs=None)
    train = PooledExamples(docs, make, collate, B, seed=d.seed)
    val = None
    if has_val:
        val_make, val_collate = _document_objective(config, tok, vocab, seed=d.seed + 1)
        val_docs = Documents(val_shards, shuffle=False, rank=rank, world_size=world, epochs=1)
        source = PooledExamples(val_docs, val_make, val_collate, B, seed=d.seed + 1)
        val = _equal_length(list(source) if max_val is None else [b for _, b in zip(range(max_val), source)])
    return PretrainData(train, val or None, overrides, save_extra, tok)


# Special ids of the synthetic vocabulary; ordinary tokens are drawn from [N_SPECIAL, V).
PAD, BOS, EOS, MASK, N_SPECIAL = 0, 1, 2, 3, 4


class SyntheticBatches:
    """Endless batches of uniformly random tokens, collated for an objective.

    Batch i of process `rank` is a pure function of (seed, rank, i) and the collator's
    seeded state, so {"index", "collator"} is the whole resumable position. Loss cannot go
    much below ln(V - 4) on such data: it measures speed and plumbing, not learning.
    """

    def __init__(self, objective: str, *, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
                 rank: int = 0, mlm_probability: float = 0.15, noise_ratio: float = 0.3,
                 mean_span_length: float = 3.0) -> None:
        if vocab_size <= N_SPECIAL + 1:
            raise ValueError(f"synthetic data needs vocab_size > {N_SPECIAL + 1}, got {vocab_size}")
        self.objective, self.batch_size, self.seq_len, self.vocab_size = objective, batch_size, seq_len, vocab_size
        self.seed, self.rank, self.index = seed, rank, 0
        vocab = VocabInfo(vocab_size, pad_id=PAD, mask_id=MASK, cls_id=BOS, sep_id=EOS, bos_id=BOS, eos_id=EOS)
        collator_seed = seed * 1000 + rank
        self.collator: Any = None
        if objective == "mlm":
            self.collator = MLMCollator(vocab, prob=mlm_probability, seed=collator_seed)
        elif objective == "mlm+nsp":
            self.collator = NSPCollator(vocab, max_len=seq_len, mlm_prob=mlm_probability, seed=collator_seed)
        elif objective == "denoise":
            self.collator = DenoisingCollator(vocab, decoder_start_id=EOS, ratio=noise_ratio,
                                              poisson_lambda=mean_span_length, max_len=seq_len, seed=collator_seed)

    def _tokens(self, n: int, length: int) -> Tensor:
        seed = np.random.SeedSequence([self.seed, self.rank, self.index]).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(seed) % 2**63)
        return torch.randint(N_SPECIAL, self.vocab_size, (n, length), generator=gen)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        B, T = self.batch_size, self.seq_len
        if self.objective == "clm":
            batch = clm_windows(self._tokens(B, T + 1))
        elif self.objective == "mlm":
            batch = self.collator(list(self._tokens(B, T)))
        elif self.objective == "mlm+nsp":
            a, b = self._tokens(B, T // 2 - 2), self._tokens(B, T // 2 - 1)
            batch = self.collator([(a[i], b[i], i % 2) for i in range(B)])
        else:
            batch = self.collator(list(self._tokens(B, T - 2)))
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "collator": self.collator.state_dict() if self.collator else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])
        if self.collator is not None:
            self.collator.load_state_dict(state["collator"])

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Continue after a run of len(states) processes: at the same batch number (the draws of
        a rank are its own, so another number of processes sees other random tokens)."""
        self.index = int(same_position(states, "index", "SyntheticBatches")["index"])
        if self.collator is not None and self.rank < len(states):
            self.collator.load_state_dict(states[self.rank]["collator"])


def synthetic_data(config: RunConfig, env: DistEnv, vocab_size: int) -> PretrainData:
    """Random-token batches for config.train.objective (data.synthetic=true): this process's
    training batches and 4 fixed validation batches."""
    d, t = config.data, config.train

    def batches(seed: int) -> SyntheticBatches:
        return SyntheticBatches(t.objective, batch_size=t.micro_batch_size, seq_len=d.seq_len, vocab_size=vocab_size,
                                seed=seed, rank=env.rank, mlm_probability=d.mlm_probability,
                                noise_ratio=d.noise_ratio, mean_span_length=d.mean_span_length)

    val_source = batches(d.seed + 1)
    overrides: dict[str, Any] = {} if t.objective == "clm" else {"pad_token_id": PAD}
    if t.objective == "denoise":
        overrides["decoder_start_token_id"] = EOS
    return PretrainData(batches(d.seed), [next(val_source) for _ in range(4)], overrides)
