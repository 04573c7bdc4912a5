"""Corpus preparation: exact round trip, separators, dtype, deterministic split, idempotence,
atomic output, and the memory-mapped reader over the result."""

import importlib.resources
import json
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from lmforge.data.prepare import prepare_corpus
from lmforge.data.shards import TokenShards, token_dtype
from lmforge.tokenizer import Tokenizer, train_tokenizer

SHAKESPEARE = importlib.resources.files("lmforge") / "corpus" / "tinyshakespeare.txt"


def unique_docs(n: int) -> list[str]:
    docs = list(dict.fromkeys(d.strip("\n") for d in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")))
    return [d for d in docs if d.strip()][:n]


DOCS = unique_docs(300) + ["中文文档：今天天气很好。", "emoji \U0001f600 and\ttabs"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer(texts=unique_docs(2000), kind="bpe", vocab_size=500)


def write_txt(path, docs):
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def read_dir(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_round_trip_separators_and_shards(bpe, tmp_path):
    corpus = write_txt(tmp_path / "corpus.txt", DOCS)
    stats = prepare_corpus(bpe, corpus, tmp_path / "out", val_fraction=0.0, num_workers=2, chunk_chars=3000,
                           shard_tokens=4000)
    train = TokenShards(tmp_path / "out", "train")
    assert stats["splits"]["train"]["n_docs"] == train.n_docs == len(DOCS)
    assert stats["splits"]["validation"] == {"n_tokens": 0, "n_docs": 0, "n_shards": 0}
    assert stats["n_tokens"] == train.n_tokens and stats["dtype"] == "uint16" and train.dtype == np.uint16
    assert stats["splits"]["train"]["n_shards"] > 2 and stats["mb_per_s"] > 0 and stats["tokens_per_s"] > 0
    assert [bpe.decode(train.document(i)) for i in range(train.n_docs)] == DOCS  # exact, in order
    # Exactly one EOS after every document, none inside (the corpus holds no <|endoftext|>).
    everything = train.tokens(0, train.n_tokens)
    assert np.array_equal(np.flatnonzero(everything == bpe.eos_id), train.doc_offsets[1:] - 1)
    assert train.n_tokens == sum(len(bpe.encode(d)) + 1 for d in DOCS)
    # A range across a shard end reads the same as the concatenated documents.
    shard_end = train.meta["splits"]["train"]["shards"][0]["n_tokens"]
    assert np.array_equal(train.tokens(shard_end - 5, shard_end + 5), everything[shard_end - 5:shard_end + 5])


def test_output_independent_of_workers_and_chunking(bpe, tmp_path):
    corpus = write_txt(tmp_path / "corpus.txt", DOCS)
    prepare_corpus(bpe, corpus, tmp_path / "a", val_fraction=0.2, num_workers=1, chunk_chars=10**9, shard_tokens=5000)
    prepare_corpus(bpe, corpus, tmp_path / "b", val_fraction=0.2, num_workers=2, chunk_chars=500, shard_tokens=5000)
    assert read_dir(tmp_path / "a") == read_dir(tmp_path / "b")


def test_tokenizer_truncation_settings_do_not_cut_documents(bpe, tmp_path):
    corpus = write_txt(tmp_path / "corpus.txt", DOCS[:20])
    truncating = Tokenizer(tokenizers.Tokenizer.from_str(bpe.backend.to_str()), bpe.special_tokens)
    truncating.backend.enable_truncation(4)
    for workers in (1, 2):
        prepare_corpus(truncating, corpus, tmp_path / f"out{workers}", val_fraction=0.0, num_workers=workers)
        shards = TokenShards(tmp_path / f"out{workers}")
        assert [bpe.decode(shards.document(i)) for i in range(shards.n_docs)] == DOCS[:20]


def test_dtype_choice():
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32


def test_uint32_for_a_large_vocabulary(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = Tokenizer(backend, {"eos": "w69999"})
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "w66000 w12"}\n{"text": "w65536"}\n')
    stats = prepare_corpus(tok, corpus, tmp_path / "out", val_fraction=0.0, num_workers=1)
    shards = TokenShards(tmp_path / "out")
    assert stats["dtype"] == "uint32" and shards.dtype == np.uint32
    assert shards.tokens(0, shards.n_tokens).tolist() == [66000, 12, 69999, 65536, 69999]


def test_split_is_by_document_deterministic_and_disjoint(bpe, tmp_path):
    docs = unique_docs(400) + ["the same line, repeated"] * 10
    corpus = write_txt(tmp_path / "corpus.txt", docs)
    prepare_corpus(bpe, corpus, tmp_path / "a", val_fraction=0.25, seed=1, num_workers=2, chunk_chars=1000)
    train, val = TokenShards(tmp_path / "a", "train"), TokenShards(tmp_path / "a", "validation")
    train_docs = [bpe.decode(train.document(i)) for i in range(train.n_docs)]
    val_docs = [bpe.decode(val.document(i)) for i in range(val.n_docs)]
    assert 50 < len(val_docs) < 160 and train.n_docs + val.n_docs == len(docs)
    assert sorted(train_docs + val_docs) == sorted(docs) and not set(train_docs) & set(val_docs)
    assert (train_docs + val_docs).count("the same line, repeated") == 10  # duplicates share a split
    # Same seed, other chunking: same split; another seed: another split.
    prepare_corpus(bpe, corpus, tmp_path / "b", val_fraction=0.25, seed=1, num_workers=1, chunk_chars=10**9)
    assert read_dir(tmp_path / "a") == read_dir(tmp_path / "b")
    prepare_corpus(bpe, corpus, tmp_path / "c", val_fraction=0.25, seed=2, num_workers=1)
    other = TokenShards(tmp_path / "c", "validation")
    assert {bpe.decode(other.document(i)) for i in range(other.n_docs)} != set(val_docs)


def test_idempotent_rerun(bpe, tmp_path):
    corpus = write_txt(tmp_path / "corpus.txt", DOCS[:50])
    first = prepare_corpus(bpe, corpus, tmp_path / "out", val_fraction=0.1, num_workers=1)
    before = read_dir(tmp_path / "out")
    mtime = (tmp_path / "out" / "meta.json").stat().st_mtime_ns
    again = prepare_corpus(bpe, corpus, tmp_path / "out", val_fraction=0.1, num_workers=2)
    assert again["skipped"] and not first["skipped"]
    assert again["n_tokens"] == first["n_tokens"] and again["splits"] == first["splits"]
    assert (tmp_path / "out" / "meta.json").stat().st_mtime_ns == mtime
    rebuilt = prepare_corpus(bpe, corpus, tmp_path / "out", val_fraction=0.1, num_workers=2, overwrite=True)
    assert not rebuilt["skipped"] and read_dir(tmp_path / "out") == before  # rewritten identically
    write_txt(corpus, DOCS[:60])  # the input changed: prepared again
    changed = prepare_corpus(bpe, corpus, tmp_path / "out", val_fraction=0.1, num_workers=1)
    assert not changed["skipped"] and changed["n_docs"] == 60
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_failure_leaves_no_partial_output(bpe, tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text("\n".join(json.dumps({"text": d}) for d in DOCS[:100]) + "\n")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:3: malformed JSON"):
        prepare_corpus(bpe, [good, bad], tmp_path / "out", num_workers=2, chunk_chars=100)
    assert not (tmp_path / "out").exists()
    prepare_corpus(bpe, good, tmp_path / "out", num_workers=1)
    kept = read_dir(tmp_path / "out")
    with pytest.raises(ValueError, match=r"b\.jsonl:3"):
        prepare_corpus(bpe, [good, bad], tmp_path / "out", num_workers=1)
    assert read_dir(tmp_path / "out") == kept  # the earlier preparation is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]


def test_refuses_foreign_directory_and_bad_arguments(bpe, tmp_path):
    corpus = write_txt(tmp_path / "corpus.txt", DOCS[:5])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"mine: exists, is not empty and is not a prepared data directory"):
        prepare_corpus(bpe, corpus, tmp_path / "mine")
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_corpus(bpe, corpus, tmp_path / "out", val_fraction=1.0)
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_corpus(bpe, write_txt(tmp_path / "empty.txt", []), tmp_path / "out")
    no_eos = Tokenizer(bpe.backend, {"pad": "<|pad|>"})
    with pytest.raises(ValueError, match="neither an EOS nor a SEP"):
        prepare_corpus(no_eos, corpus, tmp_path / "out")


def test_wordpiece_separator_and_tokenizer_path(tmp_path):
    wp = train_tokenizer(texts=unique_docs(500), kind="wordpiece", vocab_size=400, lowercase=True)
    wp.save(tmp_path / "tok")
    corpus = write_txt(tmp_path / "corpus.txt", DOCS[:20])
    prepare_corpus(tmp_path / "tok", corpus, tmp_path / "out", val_fraction=0.0, num_workers=1)
    shards = TokenShards(tmp_path / "out")
    assert shards.eos_id == wp.sep_id and shards.document(0, with_separator=True)[-1] == wp.sep_id
    assert wp.cls_id not in shards.tokens(0, shards.n_tokens)  # no [CLS]: collators add their own specials
    assert [shards.document(i).tolist() for i in range(20)] == wp.encode_batch(DOCS[:20], add_special_tokens=False)


def test_token_shards_errors(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing: not a prepared data directory"):
        TokenShards(tmp_path / "nothing")
    corpus = write_txt(tmp_path / "corpus.txt", DOCS[:30])
    prepare_corpus(bpe, corpus, tmp_path / "out", val_fraction=0.0, num_workers=1)
    shards = TokenShards(tmp_path / "out")
    shards.check_tokenizer(bpe)
    other = train_tokenizer(texts=DOCS, kind="bpe", vocab_size=400)
    with pytest.raises(ValueError, match=r"out: prepared with a different tokenizer"):
        shards.check_tokenizer(other)
    with pytest.raises(ValueError, match=r"no split 'test'"):
        TokenShards(tmp_path / "out", "test")
    with pytest.raises(IndexError):
        shards.tokens(0, shards.n_tokens + 1)
    assert np.array_equal(shards.document(-1), shards.document(shards.n_docs - 1))
    shard = tmp_path / "out" / "train-00000.bin"
    os.truncate(shard, shard.stat().st_size - 2)
    with pytest.raises(ValueError, match=r"train-00000\.bin: .* bytes, expected"):
        TokenShards(tmp_path / "out")
