"""Build a small extractive-QA data set (SQuAD v1.1 JSON) from Tiny Shakespeare.

    python scripts/make_shakespeare_qa.py --out data/shakespeare-qa
    # -> data/shakespeare-qa/train.json, valid.json, and valid-who.json / valid-next.json
    #    (the validation questions of each kind, to score them apart)

Tiny Shakespeare is a run of speeches, each a speaker's name on its own line ("ROMEO:")
followed by the lines spoken, speeches separated by blank lines. A context is a passage of
two consecutive speeches (`--speeches-per-passage`), exactly as they stand in the text. Each speech of the passage
gets up to two questions, each quoting one of its lines:

    who    'Who says "Speak, speak."?'               answer: the speaker's name, at the
                                                     heading of that speech ("All")
    next   'What is the line after "Speak, speak."?' answer: the next line of the speech

So every answer is a span of the context (SQuAD v1.1: every question has one). `next`
takes finding the quoted line and reading on; `who` takes one step more: finding the
quoted line, then the name that heads its speech. A passage has at least two speakers
(else `who` has nothing to choose from); a quoted line (and a `next` answer) appears once
in its context and has at least `--min-words` words. The first 90% of the passages (in the
text's order) train and the last 10% validate, so the two share no text (and about half the
validation speakers never speak in training: the last plays have their own).

The default input is the copy of Tiny Shakespeare packaged with lmforge (public domain).
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.files import atomic_write_json
from lmforge.quickstart import default_corpus

SPEAKER = re.compile(r"[A-Z][A-Za-z' .,&-]*:")  # a speech's heading line, "KING RICHARD III:"
KINDS = ("who", "next")


@dataclass
class Speech:
    speaker: str  # the heading without its colon
    lines: list[str]  # what is spoken, one verse line each

    @property
    def text(self) -> str:
        return "\n".join([f"{self.speaker}:", *self.lines])


def read_speeches(text: str) -> list[Speech]:
    """The speeches of a Tiny-Shakespeare-like text (blocks that do not start with a heading are skipped)."""
    speeches = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if len(lines) >= 2 and SPEAKER.fullmatch(lines[0]):
            speeches.append(Speech(lines[0][:-1], lines[1:]))
    return speeches


def passages(speeches: list[Speech], per_passage: int, max_chars: int) -> list[list[Speech]]:
    """Consecutive speeches grouped into passages of at most per_passage speeches and max_chars
    characters (a single longer speech is a passage of its own)."""
    out: list[list[Speech]] = []
    current: list[Speech] = []
    for s in speeches:
        size = sum(len(x.text) + 2 for x in current) + len(s.text)
        if current and (len(current) == per_passage or size > max_chars):
            out.append(current)
            current = []
        current.append(s)
    if current:
        out.append(current)
    return out


def paragraph(passage: list[Speech], number: int, rng: random.Random, min_words: int,
              kinds: tuple[str, ...] = KINDS) -> dict:
    """One SQuAD paragraph: the passage as context and up to one question of each kind per speech."""
    context = "\n\n".join(s.text for s in passage)
    quotable = lambda line: len(line.split()) >= min_words and context.count(line) == 1
    qas, start = [], 0
    for i, s in enumerate(passage):
        if "who" in kinds and (candidates := [line for line in s.lines if quotable(line)]):
            quote = rng.choice(candidates)
            qas.append({"id": f"p{number}-s{i}-who", "question": f'Who says "{quote}"?',
                        "answers": [{"text": s.speaker, "answer_start": start}]})
        pairs = [(a, b) for a, b in zip(s.lines, s.lines[1:]) if quotable(a) and quotable(b)]
        if "next" in kinds and pairs:
            quote, answer = rng.choice(pairs)
            at = context.index(quote + "\n" + answer) + len(quote) + 1
            qas.append({"id": f"p{number}-s{i}-next", "question": f'What is the line after "{quote}"?',
                        "answers": [{"text": answer, "answer_start": at}]})
        start += len(s.text) + 2  # the speech and the blank line after it
    return {"context": context, "qas": qas}


def squad(paragraphs: list[dict], title: str) -> dict:
    return {"version": "1.1", "data": [{"title": title, "paragraphs": paragraphs}]}


def of_kind(paragraphs: list[dict], kind: str) -> list[dict]:
    """The paragraphs with only their questions of one kind."""
    kept = [{**p, "qas": [q for q in p["qas"] if q["id"].endswith(f"-{kind}")]} for p in paragraphs]
    return [p for p in kept if p["qas"]]


def build(text: str, *, per_passage: int = 2, max_chars: int = 400, valid_fraction: float = 0.1,
          min_words: int = 3, kinds: tuple[str, ...] = KINDS, seed: int = 0) -> dict[str, dict]:
    """{"train", "valid", "valid-who", "valid-next"}: SQuAD v1.1 objects from the text (one
    valid-KIND set per kind asked)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"question kinds must be among {KINDS}, got {list(kinds)}")
    rng = random.Random(seed)
    groups = passages(read_speeches(text), per_passage, max_chars)
    groups = [g for g in groups if len({s.speaker for s in g}) >= 2]  # one speaker: `who` is trivial
    paragraphs = [p for n, g in enumerate(groups) if (p := paragraph(g, n, rng, min_words, kinds))["qas"]]
    cut = round(len(paragraphs) * (1 - valid_fraction))
    train, valid = paragraphs[:cut], paragraphs[cut:]
    sets = {"train": squad(train, "Tiny Shakespeare (train)"), "valid": squad(valid, "Tiny Shakespeare (valid)")}
    for kind in kinds:
        sets[f"valid-{kind}"] = squad(of_kind(valid, kind), f"Tiny Shakespeare (valid, {kind} questions)")
    return sets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=None, help="the text (default: lmforge's packaged Tiny Shakespeare)")
    parser.add_argument("--out", required=True, help="output directory: train.json, valid.json, valid-KIND.json")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="question kinds to ask")
    parser.add_argument("--speeches-per-passage", type=int, default=2)
    parser.add_argument("--max-chars", type=int, default=400,
                        help="longest context, in characters (400: about 100 WordPiece tokens)")
    parser.add_argument("--valid-fraction", type=float, default=0.1)
    parser.add_argument("--min-words", type=int, default=3, help="shortest quoted line, in words")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    source = Path(a.input) if a.input else default_corpus()
    sets = build(source.read_text(encoding="utf-8"), per_passage=a.speeches_per_passage, max_chars=a.max_chars,
                 valid_fraction=a.valid_fraction, min_words=a.min_words, kinds=tuple(a.kinds), seed=a.seed)
    for name, data in sets.items():
        path = Path(a.out) / f"{name}.json"
        atomic_write_json(path, data)
        paragraphs = data["data"][0]["paragraphs"]
        print(f"{path}: {sum(len(p['qas']) for p in paragraphs):,} questions on {len(paragraphs):,} contexts")


if __name__ == "__main__":
    main()
