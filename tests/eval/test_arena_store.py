"""The arena's ratings database: schema and WAL mode, versioning, refusing files it does not
own (left unchanged), the rules of a vote, and concurrent writers."""

from __future__ import annotations

import secrets
import sqlite3
import threading

import pytest

from lmforge.eval.arena_store import SCHEMA_VERSION, ArenaStore, Battle, StudyItem, VoteRefused, read_votes

PAIRS = {frozenset(("m1", "m2"))}


def battle(store: ArenaStore, rater: str, item: str, answered: bool = True, pair=("m1", "m2")) -> str:
    store.rater_ordinal(rater)
    battle_id = secrets.token_hex(8)
    store.add_battle(Battle(battle_id, rater, item, "a prompt", *pair, "open"), keep_open=8)
    if answered:
        store.store_answers(battle_id, "left", "right")
    return battle_id


def test_a_new_database_is_versioned_and_in_wal_mode(tmp_path):
    store = ArenaStore(tmp_path / "sub" / "ratings.db")
    store.close()
    db = sqlite3.connect(tmp_path / "sub" / "ratings.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"meta", "study", "raters", "battles", "votes"}
    db.close()
    ArenaStore(tmp_path / "sub" / "ratings.db").close()  # reopens


def test_files_that_are_not_arena_databases_are_refused_and_left_alone(tmp_path):
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE mine (x)")
    db.commit()
    db.close()
    newer = tmp_path / "newer.db"
    ArenaStore(newer).close()
    db = sqlite3.connect(newer)
    db.execute("PRAGMA user_version = 7")
    db.commit()
    db.close()
    text = tmp_path / "notes.db"
    text.write_text("my notes, not a database\n" * 100)
    for path, says in ((other, "not an lmforge arena database"), (newer, "schema version 7 is newer"),
                       (text, "not an arena database"), (tmp_path, "is a directory")):
        before = path.read_bytes() if path.is_file() else None
        with pytest.raises(ValueError, match=says):
            ArenaStore(path)
        if before is not None:
            assert path.read_bytes() == before
    with pytest.raises(ValueError, match="schema version 1"):
        read_votes(other)


def test_the_rules_of_a_vote(tmp_path):
    store = ArenaStore(tmp_path / "r.db")
    b = battle(store, "alice", "i1")
    with pytest.raises(VoteRefused, match="one of a, b, tie, both_bad") as info:
        store.vote(b, "alice", "left", "", PAIRS)
    assert info.value.status == 400
    with pytest.raises(VoteRefused, match="no such battle") as info:
        store.vote("nope", "alice", "a", "", PAIRS)
    assert info.value.status == 404
    with pytest.raises(VoteRefused, match="no such battle"):
        store.vote(b, "bob", "a", "", PAIRS)  # another rater's battle
    with pytest.raises(VoteRefused, match="pairing") as info:
        store.vote(b, "alice", "a", "", {frozenset(("m1", "m3"))})
    assert info.value.code == "unknown_pairing"
    unanswered = battle(store, "alice", "i2", answered=False)
    with pytest.raises(VoteRefused, match="no complete answers") as info:
        store.vote(unanswered, "alice", "a", "", PAIRS)
    assert info.value.status == 409
    assert store.vote(b, "alice", "tie", "close call", PAIRS) == 1
    again = battle(store, "alice", "i1")  # the same item shown again: one vote per rater and item
    with pytest.raises(VoteRefused, match="already voted") as info:
        store.vote(again, "alice", "a", "", PAIRS)
    assert info.value.code == "already_voted"
    assert store.vote(battle(store, "bob", "i1"), "bob", "b", "", PAIRS) == 2  # another rater may
    [first, second] = read_votes(store.path)
    assert (first["rater"], first["item"], first["choice"], first["reason"], first["answer_a"]) == \
        ("alice", "i1", "tie", "close call", "left")
    assert second["rater"] == "bob"
    with pytest.raises(sqlite3.IntegrityError):  # the schema itself holds the rule
        store._db.execute("INSERT INTO votes (battle, rater, item, model_a, model_b, choice, created) "
                          "VALUES (?, 'alice', 'i1', 'm1', 'm2', 'a', 0)", (unanswered,))
    store.close()


def test_open_battles_are_bounded_per_rater(tmp_path):
    store = ArenaStore(tmp_path / "r.db")
    ids = [battle(store, "alice", f"free:{k}") for k in range(5)]
    store.add_battle(Battle("newest", "alice", "free:new", "p", "m1", "m2", "open"), keep_open=3)
    states = [store.battle(b).state for b in ids]
    assert states == ["replaced", "replaced", "replaced", "answered", "answered"]
    with pytest.raises(VoteRefused, match="replaced"):
        store.vote(ids[0], "alice", "a", "", PAIRS)
    store.vote(ids[4], "alice", "a", "", PAIRS)
    store.close()


def test_a_study_is_stored_once_and_never_mixed(tmp_path):
    store = ArenaStore(tmp_path / "r.db")
    items = [StudyItem("x", "prompt x", "m1", "m2"), StudyItem("y", "prompt y", "m1", "m2")]
    store.load_study(items, "digest-1")
    store.load_study(items, "digest-1")  # the same study again: nothing changes
    assert store.study() == items and store.study_digest() == "digest-1"
    with pytest.raises(ValueError, match="holds another study"):
        store.load_study(items[:1], "digest-2")
    free = ArenaStore(tmp_path / "free.db")
    free.vote(battle(free, "alice", "free:1"), "alice", "a", "", PAIRS)
    with pytest.raises(ValueError, match="free prompts"):
        free.load_study(items, "digest-1")
    store.close()
    free.close()


def test_concurrent_raters_lose_no_vote(tmp_path):
    path = tmp_path / "r.db"
    store = ArenaStore(path)
    raters = [f"rater{k}" for k in range(8)]
    battles = {r: [battle(store, r, f"item{i}") for i in range(6)] for r in raters}
    other = ArenaStore(path)  # a second connection, as a second server process would hold
    errors = []

    def rate(r: str, st: ArenaStore) -> None:
        try:
            for b in battles[r]:
                st.vote(b, r, "a", "", PAIRS)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=rate, args=(r, store if k % 2 else other)) for k, r in enumerate(raters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(read_votes(path)) == 48 and len({v["vote"] for v in read_votes(path)}) == 48
    store.close()
    other.close()
