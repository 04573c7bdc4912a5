"""A study for the arena: a JSONL file of prompts that every rater judges, each rater in
an order of their own, balanced across raters, with the two answers' sides swapped at
random.

Each line is an object; only "prompt" is required:

    {"prompt": "Write a haiku about rain.", "id": "haiku", "models": ["small", "big"],
     "max_tokens": 128, "temperature": 0.7}

"id" names the item (default: its line number); "models" fixes the pair it compares,
otherwise the items are spread evenly over every pair of the models served (in an
order shuffled once, from the study's content). An item's answers are sampled with a
seed of its own, so every rater is shown the same answers of a local model.

Order: rater k (by order of first appearance) takes row k of a Williams design over the
items (a Latin square in which, for an even number of items, every item also follows
every other exactly once; for an odd number the rows and their mirror images, 2n
rows), applied to a shuffled list of the items. So over n raters (2n when odd) every
item is seen at every position equally often, and fatigue or warm-up does not fall on
the same items. Which answer is on the left is decided per rater and item from a hash:
random, but the same on a reload.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from lmforge.eval.arena_store import StudyItem

MAX_ITEMS = 10_000
MAX_FILE_BYTES = 16 << 20
MAX_PROMPT_CHARS = 20_000
MAX_ID_CHARS = 128
DEFAULT_OPTIONS = {"max_tokens": 256, "temperature": 0.7}
_FIELDS = {"prompt", "id", "models", "max_tokens", "temperature"}


def load_study(path: str | os.PathLike, models: Sequence[str]) -> tuple[list[StudyItem], str]:
    """The items of a study file for the models served, and the study's digest (a hash of
    the items as resolved: prompts, pairs and options). A mistake raises ValueError
    naming the file, line and field."""
    path = Path(path)
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MB")
    if len(models) < 2:
        raise ValueError(f"{path}: a study compares models: serve two or more")
    lines = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                lines.append((number, _parse_line(path, number, line, models)))
            if len(lines) > MAX_ITEMS:
                raise ValueError(f"{path}:{number}: more than {MAX_ITEMS} items")
    if not lines:
        raise ValueError(f"{path}: no items (one JSON object per line, each with a \"prompt\")")
    seen: dict[str, int] = {}
    for number, record in lines:
        if record["id"] in seen:
            raise ValueError(f"{path}:{number}: id {record['id']!r} is also the id of line {seen[record['id']]}")
        seen[record["id"]] = number
    pairs = list(itertools.combinations(sorted(models), 2))
    random.Random(_digest([r["prompt"] for _, r in lines])).shuffle(pairs)
    free = itertools.cycle(pairs)
    items = []
    for _, r in lines:
        model_1, model_2 = sorted(r["models"]) if r["models"] else next(free)
        options = {k: r[k] for k in DEFAULT_OPTIONS if r.get(k) is not None}
        options["seed"] = int(_digest([r["id"]])[:8], 16)
        items.append(StudyItem(r["id"], r["prompt"], model_1, model_2, json.dumps(options, sort_keys=True)))
    return items, _digest([asdict(i) for i in items])


def _parse_line(path: Path, number: int, line: str, models: Sequence[str]) -> dict:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{where}: not a JSON object ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: not a JSON object")
    unknown = set(record) - _FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r} (fields: {', '.join(sorted(_FIELDS))})")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"{where}: prompt must be a non-empty string of at most {MAX_PROMPT_CHARS} characters")
    item_id = record.get("id", str(number))
    if not isinstance(item_id, str | int) or isinstance(item_id, bool) or not str(item_id) \
            or len(str(item_id)) > MAX_ID_CHARS:
        raise ValueError(f"{where}: id must be a string or number of 1 to {MAX_ID_CHARS} characters")
    pair = record.get("models")
    if pair is not None:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(m, str) for m in pair)
                and pair[0] != pair[1]):
            raise ValueError(f"{where}: models must be a list of two different model names")
        for m in pair:
            if m not in models:
                raise ValueError(f"{where}: models: {m!r} is not served here (served: {', '.join(models)})")
    max_tokens = record.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise ValueError(f"{where}: max_tokens must be a positive integer")
    temperature = record.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, int | float)
                                    or not 0 <= temperature <= 2):
        raise ValueError(f"{where}: temperature must be a number in [0, 2]")
    return {"prompt": prompt, "id": str(item_id), "models": pair, "max_tokens": max_tokens,
            "temperature": temperature}


def _digest(values: list) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def williams_row(n: int, row: int) -> list[int]:
    """Row `row` of a Williams design over n treatments: n rows for even n (each treatment
    once per position, each ordered pair of neighbours once), 2n for odd n (rows n.. are
    rows 0.. reversed)."""
    offsets = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    rows = n if n % 2 == 0 else 2 * n
    r = row % rows
    seq = [(r % n + o) % n for o in offsets]
    return seq if r < n else seq[::-1]


def rater_order(n_items: int, ordinal: int, digest: str) -> list[int]:
    """The positions of the study's items in the order the rater with this ordinal sees them."""
    base = list(range(n_items))
    random.Random(digest).shuffle(base)
    return [base[i] for i in williams_row(n_items, ordinal)]


def swapped(digest: str, rater: str, item: str) -> bool:
    """Whether the rater sees the item's second model on the left: random per rater and
    item, the same every time it is asked."""
    return hashlib.sha256(f"{digest}\n{rater}\n{item}".encode()).digest()[0] & 1 == 1
