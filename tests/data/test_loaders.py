"""Loaders: windows are real corpus slices with shifted labels, resumed equals uninterrupted,
ranks split the global batch, packing keeps documents whole and marks their boundaries."""

import importlib.resources

import numpy as np
import pytest
import torch

from lmforge.data.batching import IGNORE_INDEX
from lmforge.data.loaders import Documents, PackedDocuments, RandomWindows, SequentialWindows
from lmforge.data.prepare import prepare_corpus
from lmforge.data.shards import TokenShards
from lmforge.tokenizer import train_tokenizer

SHAKESPEARE = importlib.resources.files("lmforge") / "corpus" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    docs = [d for d in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if d.strip()][:600]
    tok = train_tokenizer(texts=docs, kind="bpe", vocab_size=400)
    root = tmp_path_factory.mktemp("prepared")
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    # Small shards, so windows and documents regularly cross shard ends.
    prepare_corpus(tok, root / "corpus.txt", root / "out", val_fraction=0.1, num_workers=1, shard_tokens=3000)
    return root / "out"


@pytest.fixture(scope="module")
def train(prepared):
    return TokenShards(prepared, "train")


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def test_random_windows_are_corpus_slices_with_shifted_labels(train):
    assert len(train.meta["splits"]["train"]["shards"]) > 3
    corpus = train.tokens(0, train.n_tokens).astype(np.int64)
    batch = next(RandomWindows(train, batch_size=8, seq_len=32, seed=3))
    x, y = batch["input_ids"], batch["labels"]
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        starts = [s for s in np.flatnonzero(corpus == row_x[0]) if np.array_equal(corpus[s:s + 32], row_x)]
        assert any(np.array_equal(corpus[s + 1:s + 33], row_y) for s in starts)


def test_random_windows_seeded_and_resumable(train):
    reference = take(RandomWindows(train, 4, 16, seed=7), 6)
    assert_batches_equal(reference, take(RandomWindows(train, 4, 16, seed=7), 6))
    assert not torch.equal(reference[0]["input_ids"], next(RandomWindows(train, 4, 16, seed=8))["input_ids"])
    first = RandomWindows(train, 4, 16, seed=7)
    take(first, 2)
    state = first.state_dict()
    resumed = RandomWindows(train, 4, 16, seed=7)
    resumed.load_state_dict(state)
    assert_batches_equal(take(resumed, 4), reference[2:])
    with pytest.raises(ValueError, match="saved seq_len=16 but this loader has 32"):
        RandomWindows(train, 4, 32, seed=7).load_state_dict(state)


def test_random_windows_continue_on_another_number_of_processes(train):
    """The position is global windows: 2 processes stopped after 3 batches continue as 1 process
    (the same global batch, or another micro-batch with accumulation) or as 4."""
    single = take(RandomWindows(train, 4, 16, seed=5), 6)
    ranks = [RandomWindows(train, 2, 16, seed=5, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        take(loader, 3)
    states = [loader.state_dict() for loader in ranks]
    one = RandomWindows(train, 4, 16, seed=5)
    one.load_state_dicts(states)
    assert_batches_equal(take(one, 3), single[3:])
    halves = RandomWindows(train, 2, 16, seed=5)  # micro-batch 2, two micro-batches a step
    halves.load_state_dicts(states)
    assert torch.equal(torch.cat([b["input_ids"] for b in take(halves, 2)]), single[3]["input_ids"])
    four = [RandomWindows(train, 1, 16, seed=5, rank=r, world_size=4) for r in range(4)]
    for loader in four:
        loader.load_state_dicts(states)
    assert torch.equal(torch.cat([next(loader)["input_ids"] for loader in four]), single[3]["input_ids"])


def test_documents_continue_after_the_last_document_read(train):
    """Pools per process: another number of processes continues after the furthest document any
    process had read; no document is read twice."""
    from lmforge.data.loaders import PooledExamples

    class Collate:
        def __init__(self):
            self.seen = []

        def __call__(self, docs):
            self.seen += [tuple(d.tolist()) for d in docs]
            return {"input_ids": torch.zeros(len(docs), 1)}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    def pooled(rank, world):
        docs = Documents(train, shuffle=True, seed=3, rank=rank, world_size=world, epochs=1)
        return PooledExamples(docs, lambda pool, seed: list(pool), Collate(), 4, pool_docs=8)

    def read(loader):
        for _ in loader:
            pass
        return loader.collate.seen

    two = [pooled(r, 2) for r in range(2)]
    for loader in two:
        for _ in range(3):
            next(loader)
    before = [d for loader in two for d in loader.collate.seen]
    one = pooled(0, 1)
    one.load_state_dicts([loader.state_dict() for loader in two])
    after = read(one)
    everything = read(pooled(0, 1))
    assert len(set(before) | set(after)) == len(before) + len(after)  # nothing twice
    assert len(before) + len(after) >= len(everything) - 2 * 8  # at most a pool per process skipped


def test_random_windows_ranks_split_the_global_batch(train):
    single = take(RandomWindows(train, 6, 16, seed=1), 3)
    ranks = [take(RandomWindows(train, 2, 16, seed=1, rank=r, world_size=3), 3) for r in range(3)]
    for step in range(3):
        for key in ("input_ids", "labels"):
            assert torch.equal(torch.cat([ranks[r][step][key] for r in range(3)]), single[step][key])
    with pytest.raises(ValueError, match="rank"):
        RandomWindows(train, 2, 16, rank=3, world_size=3)


def test_sequential_windows_cover_the_split(prepared):
    val = TokenShards(prepared, "validation")
    loader = SequentialWindows(val, batch_size=4, seq_len=16)
    batches = list(loader)
    n_windows = (val.n_tokens - 1) // 16
    assert len(batches) == len(loader) == -(-n_windows // 4)
    inputs = torch.cat([b["input_ids"] for b in batches]).reshape(-1)
    labels = torch.cat([b["labels"] for b in batches]).reshape(-1)
    corpus = torch.from_numpy(val.tokens(0, val.n_tokens).astype(np.int64))
    assert torch.equal(inputs, corpus[:n_windows * 16]) and torch.equal(labels, corpus[1:n_windows * 16 + 1])
    assert_batches_equal(list(loader), batches)  # a second pass is the same pass
    assert len(SequentialWindows(val, 4, 16, max_batches=2)) == 2


def test_sequential_windows_ranks(train):
    single = list(SequentialWindows(train, 4, 32))
    ranks = [list(SequentialWindows(train, 2, 32, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # every rank runs the same number of eval steps
    n_full = (train.n_tokens - 1) // 32 // 4
    for step in range(n_full):
        assert torch.equal(torch.cat([ranks[0][step]["input_ids"], ranks[1][step]["input_ids"]]),
                           single[step]["input_ids"])
    labelled = torch.cat([b["input_ids"][(b["labels"] != -100).any(1)] for r in ranks for b in r])
    everything = torch.cat([b["input_ids"] for b in single])
    assert sorted(map(tuple, labelled.tolist())) == sorted(map(tuple, everything.tolist()))  # each window once


def test_sequential_windows_pad_a_rank_short_of_windows(prepared):
    val = TokenShards(prepared, "validation")
    n = (val.n_tokens - 1) // 16
    world = next(w for w in (3, 4, 5, 7) if n % w)  # the last rank is short of windows
    ranks = [list(SequentialWindows(val, n, 16, rank=r, world_size=world)) for r in range(world)]
    assert [len(r) for r in ranks] == [1] * world and len({r[0]["input_ids"].shape for r in ranks}) == 1
    assert (ranks[-1][0]["labels"] == -100).all(1).any()
    labelled = sum(int((r[0]["labels"] != -100).any(1).sum()) for r in ranks)
    assert labelled == n  # the padding rows of the last rank carry no labels


def check_packed_row(train, ids, labels, doc_ids, positions, seq_len):
    """Segments are whole documents (or pieces of documents longer than a row) with consistent metadata."""
    docs = {tuple(train.document(i, with_separator=True).tolist()) for i in range(train.n_docs)}
    lengths = train.doc_lengths
    pieces = []
    for k in range(int(doc_ids.max()) + 1):
        where = np.flatnonzero(doc_ids == k)
        assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
        seg = ids[where]
        assert np.array_equal(positions[where], np.arange(len(where)))
        assert np.array_equal(labels[where[:-1]], seg[1:]) and labels[where[-1]] == IGNORE_INDEX
        pieces.append(seg)
        if len(seg) < seq_len and tuple(seg.tolist()) not in docs:  # a cut document: only the long ones
            assert lengths.max() > seq_len
    pad = doc_ids == -1
    assert np.all(labels[pad] == IGNORE_INDEX) and np.all(ids[pad] == train.eos_id)
    return pieces


def test_packed_documents_keep_documents_whole(train):
    seq_len = 64
    loader = PackedDocuments(train, batch_size=4, seq_len=seq_len, shuffle=False, epochs=1)
    batches = list(loader)
    assert all(b[k].shape[1] == seq_len and b[k].dtype == torch.int64 for b in batches for k in b)
    pieces = []
    for b in batches:
        for row in range(len(b["input_ids"])):
            pieces += check_packed_row(train, *(b[k][row].numpy() for k in
                                                ("input_ids", "labels", "doc_ids", "position_ids")), seq_len)
    # One pass in stored order reproduces the corpus exactly, long documents reassembled from their pieces.
    assert np.array_equal(np.concatenate(pieces), train.tokens(0, train.n_tokens))
    lengths = train.doc_lengths
    whole = sum(1 for p in pieces if len(p) <= seq_len)
    assert whole >= int((lengths <= seq_len).sum())  # every document that fits a row is a single piece


def test_packed_documents_resume_and_ranks(train):
    reference = take(PackedDocuments(train, 3, 48, seed=5), 8)
    first = PackedDocuments(train, 3, 48, seed=5)
    take(first, 3)
    resumed = PackedDocuments(train, 3, 48, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert_batches_equal(take(resumed, 5), reference[3:])
    single = take(PackedDocuments(train, 4, 48, seed=2), 3)
    ranks = [take(PackedDocuments(train, 2, 48, seed=2, rank=r, world_size=2), 3) for r in range(2)]
    for step in range(3):
        for key in single[step]:
            assert torch.equal(torch.cat([ranks[0][step][key], ranks[1][step][key]]), single[step][key])


def test_packed_documents_run_across_epochs(train):
    loader = PackedDocuments(train, batch_size=8, seq_len=256, seed=0)
    real_tokens = 0
    while loader.state_dict()["epoch"] == 0:
        real_tokens += int((next(loader)["doc_ids"] >= 0).sum())
    assert real_tokens >= train.n_tokens  # the first epoch placed every token before the stream moved on
    assert real_tokens < train.n_tokens + 8 * 256


def test_documents_each_once_disjoint_across_ranks_and_resumable(train):
    everything = [d.tolist() for d in Documents(train, shuffle=False, epochs=1)]
    assert everything == [train.document(i).tolist() for i in range(train.n_docs)]
    assert all(d[-1] != train.eos_id for d in everything)
    ranks = [[tuple(d.tolist()) for d in Documents(train, seed=4, rank=r, world_size=2, epochs=1)] for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(map(tuple, everything))
    assert abs(len(ranks[0]) - len(ranks[1])) <= 1
    reference = [d.tolist() for d in take(Documents(train, seed=4, epochs=None), 30)]
    first = Documents(train, seed=4, epochs=None)
    take(first, 10)
    resumed = Documents(train, seed=4, epochs=None)
    resumed.load_state_dict(first.state_dict())
    assert [d.tolist() for d in take(resumed, 20)] == reference[10:]


def test_too_little_data(prepared):
    val = TokenShards(prepared, "validation")
    with pytest.raises(ValueError, match=r"fewer than one window"):
        RandomWindows(val, 1, val.n_tokens)
    with pytest.raises(ValueError, match=r"fewer than one window"):
        SequentialWindows(val, 1, val.n_tokens)
