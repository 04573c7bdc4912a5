"""The ratings of a human evaluation (the serve arena), kept in SQLite.

One file holds a study (its items, each a prompt and the pair of models it compares),
the raters (each with the ordinal that picks their order of the items), the battles
(what one rater was shown: a prompt, which model was on the left (a) and on the
right (b), and the two answers) and the votes. Why SQLite, through the standard
library: a vote is one transaction, committed to disk (WAL journal, synchronous=FULL)
before the server acknowledges it, so a server killed mid-study loses no acknowledged
vote; several raters (and several processes) may write at once; and the file opens
anywhere without lmforge.

Rules the schema itself enforces: one vote per battle, one vote per rater and item
(UNIQUE), a choice among a, b, tie and both_bad (CHECK). The schema is versioned with
`PRAGMA user_version`; a file with another version, or one that is not an arena
database, is refused and never changed.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
CHOICES = ("a", "b", "tie", "both_bad")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE study (
    position INTEGER PRIMARY KEY,       -- 0.. in the study file's order
    item TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    model_1 TEXT NOT NULL,              -- the pair compared, in sorted order
    model_2 TEXT NOT NULL,
    options TEXT NOT NULL               -- JSON: max_tokens, temperature, seed
);
CREATE TABLE raters (rater TEXT PRIMARY KEY, ordinal INTEGER NOT NULL UNIQUE, first_seen REAL NOT NULL);
CREATE TABLE battles (
    battle TEXT PRIMARY KEY,
    rater TEXT NOT NULL REFERENCES raters(rater),
    item TEXT NOT NULL,                 -- a study item, or "free:<battle>" for a free prompt
    prompt TEXT NOT NULL,
    model_a TEXT NOT NULL,              -- shown on the left
    model_b TEXT NOT NULL,              -- shown on the right
    state TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'answered', 'replaced')),
    answer_a TEXT,
    answer_b TEXT,
    created REAL NOT NULL
);
CREATE INDEX battles_of_rater ON battles (rater, state);
CREATE TABLE votes (
    vote INTEGER PRIMARY KEY,
    battle TEXT NOT NULL UNIQUE REFERENCES battles(battle),
    rater TEXT NOT NULL,
    item TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    UNIQUE (rater, item)
);
"""
_TABLES = {"meta", "study", "raters", "battles", "votes"}


class VoteRefused(Exception):
    """A vote the store does not take: `status` is the HTTP status the server answers."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(frozen=True)
class StudyItem:
    """One item of a study: a prompt and the two models it compares (model_1 < model_2)."""

    item: str
    prompt: str
    model_1: str
    model_2: str
    options: str = "{}"  # JSON


@dataclass(frozen=True)
class Battle:
    """What one rater is shown: a prompt, the model on each side, the answers once stored."""

    battle: str
    rater: str
    item: str
    prompt: str
    model_a: str
    model_b: str
    state: str
    answer_a: str | None = None
    answer_b: str | None = None


class ArenaStore:
    """A ratings database, opened (or created) at `path`. Thread-safe: one connection,
    used under a lock; every write is one immediate transaction."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"{self.path}: is a directory, not an arena database file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.row_factory = sqlite3.Row
            self._setup()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not an arena database ({e})") from None

    def _setup(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and tables:
            raise ValueError(f"{self.path}: an SQLite database that is not an lmforge arena database (tables "
                             f"{', '.join(sorted(tables))}); it was left as it is")
        if version > SCHEMA_VERSION:
            raise ValueError(f"{self.path}: arena database schema version {version} is newer than this lmforge "
                             f"reads ({SCHEMA_VERSION})")
        if version and not _TABLES <= tables:
            raise ValueError(f"{self.path}: arena database is missing tables {sorted(_TABLES - tables)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")  # a commit is on disk before a vote is acknowledged
        self._db.execute("PRAGMA foreign_keys = ON")
        if version == 0:
            with self._write() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("INSERT INTO meta VALUES ('created', ?)", (str(time.time()),))

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, taken before reading (BEGIN IMMEDIATE), committed or rolled back."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- the study ----------------------------------------------------------------------------

    def load_study(self, items: Sequence[StudyItem], digest: str) -> None:
        """Store a study's items the first time; later, check that it is the same study."""
        with self._write() as db:
            stored = db.execute("SELECT value FROM meta WHERE key = 'study'").fetchone()
            if stored is None and db.execute("SELECT COUNT(*) FROM votes").fetchone()[0]:
                raise ValueError(f"{self.path}: holds votes on free prompts; a study needs a database of its own")
            if stored is not None:
                if stored[0] != digest:
                    raise ValueError(f"{self.path}: holds another study (other prompts or models); give the study a "
                                     "new --arena-db, so that the two are not mixed")
                return
            db.executemany("INSERT INTO study VALUES (?, ?, ?, ?, ?, ?)",
                           [(i, s.item, s.prompt, s.model_1, s.model_2, s.options) for i, s in enumerate(items)])
            db.execute("INSERT INTO meta VALUES ('study', ?)", (digest,))

    def study(self) -> list[StudyItem]:
        rows = self._read("SELECT item, prompt, model_1, model_2, options FROM study ORDER BY position")
        return [StudyItem(*r) for r in rows]

    def study_digest(self) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = 'study'")
        return rows[0][0] if rows else None

    def has_study(self) -> bool:
        return self.study_digest() is not None

    # ---- raters and battles -------------------------------------------------------------------

    def rater_ordinal(self, rater: str) -> int:
        """The rater's ordinal (0, 1, ... in order of first appearance), registering a new one."""
        with self._write() as db:
            row = db.execute("SELECT ordinal FROM raters WHERE rater = ?", (rater,)).fetchone()
            if row is not None:
                return row[0]
            ordinal = db.execute("SELECT COUNT(*) FROM raters").fetchone()[0]
            db.execute("INSERT INTO raters VALUES (?, ?, ?)", (rater, ordinal, time.time()))
            return ordinal

    def voted_items(self, rater: str) -> set[str]:
        return {r[0] for r in self._read("SELECT item FROM votes WHERE rater = ?", (rater,))}

    def add_battle(self, battle: Battle, keep_open: int) -> None:
        """Record a battle; the rater's open battles beyond the newest `keep_open` are marked
        replaced (a vote on them is refused), which bounds what one rater can hold open."""
        with self._write() as db:
            db.execute("INSERT INTO battles (battle, rater, item, prompt, model_a, model_b, state, created) "
                       "VALUES (?, ?, ?, ?, ?, ?, 'open', ?)",
                       (battle.battle, battle.rater, battle.item, battle.prompt, battle.model_a, battle.model_b,
                        time.time()))
            db.execute("UPDATE battles SET state = 'replaced' WHERE battle IN (SELECT b.battle FROM battles b "
                       "LEFT JOIN votes v ON v.battle = b.battle WHERE b.rater = ? AND v.vote IS NULL AND "
                       "b.state != 'replaced' ORDER BY b.created DESC, b.rowid DESC LIMIT -1 OFFSET ?)",
                       (battle.rater, keep_open))

    def battle(self, battle_id: str) -> Battle | None:
        rows = self._read("SELECT battle, rater, item, prompt, model_a, model_b, state, answer_a, answer_b "
                          "FROM battles WHERE battle = ?", (battle_id,))
        return Battle(*rows[0]) if rows else None

    def store_answers(self, battle_id: str, answer_a: str, answer_b: str) -> None:
        with self._write() as db:
            db.execute("UPDATE battles SET answer_a = ?, answer_b = ?, state = 'answered' "
                       "WHERE battle = ? AND state = 'open'", (answer_a, answer_b, battle_id))

    # ---- votes --------------------------------------------------------------------------------

    def vote(self, battle_id: str, rater: str, choice: str, reason: str, pairs: set[frozenset[str]]) -> int:
        """Record a vote in one transaction (on disk when this returns); its id. Refused
        (VoteRefused) for an unknown battle or one of another rater, a battle not answered
        yet or replaced, a pairing of models that is not served (`pairs`), an unknown
        choice, or a second vote of the rater on the item."""
        if choice not in CHOICES:
            raise VoteRefused(400, f"choice must be one of {', '.join(CHOICES)}, got {choice!r}", "invalid_choice")
        with self._write() as db:
            b = db.execute("SELECT item, model_a, model_b, state, rater FROM battles WHERE battle = ?",
                           (battle_id,)).fetchone()
            if b is None or b["rater"] != rater:
                raise VoteRefused(404, "no such battle for this rater", "unknown_battle")
            if frozenset((b["model_a"], b["model_b"])) not in pairs:
                raise VoteRefused(409, "this battle's pairing of models is not served here", "unknown_pairing")
            if db.execute("SELECT 1 FROM votes WHERE rater = ? AND item = ?", (rater, b["item"])).fetchone():
                raise VoteRefused(409, "this rater has already voted on this item", "already_voted")
            if b["state"] != "answered":
                why = "was replaced by a newer one" if b["state"] == "replaced" else "has no complete answers yet"
                raise VoteRefused(409, f"this battle {why}", "battle_not_ready")
            cursor = db.execute("INSERT INTO votes (battle, rater, item, model_a, model_b, choice, reason, created) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                (battle_id, rater, b["item"], b["model_a"], b["model_b"], choice, reason,
                                 time.time()))
            return cursor.lastrowid


def read_votes(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every vote of an arena database with its battle (prompt and answers), in vote order,
    reading the file without changing it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such arena database")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.OperationalError as e:
        raise ValueError(f"{path}: cannot open ({e})") from None
    try:
        db.row_factory = sqlite3.Row
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise ValueError(f"{path}: not an arena database of schema version {SCHEMA_VERSION} (user_version "
                             f"{version})")
        rows = db.execute("SELECT v.vote, v.battle, v.created, v.rater, v.item, b.prompt, v.model_a, v.model_b, "
                          "v.choice, v.reason, b.answer_a, b.answer_b FROM votes v "
                          "JOIN battles b ON b.battle = v.battle ORDER BY v.vote").fetchall()
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{path}: not an arena database ({e})") from None
    finally:
        db.close()
    return [dict(r) for r in rows]
