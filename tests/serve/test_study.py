"""Arena studies: the JSONL file (mistakes named by line and field), pairs spread evenly over
the models, a balanced order per rater (a Williams design), sides swapped at random but
stably."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lmforge.serve.study import load_study, rater_order, swapped, williams_row


def write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_items_pairs_and_options(tmp_path):
    records = [{"prompt": f"prompt {k}"} for k in range(6)] + [{"prompt": "fixed", "id": "f", "models": ["z", "x"],
                                                                  "max_tokens": 9, "temperature": 0}]
    items, digest = load_study(write(tmp_path / "s.jsonl", records), ["x", "y", "z"])
    assert [i.item for i in items] == ["1", "2", "3", "4", "5", "6", "f"]
    assert Counter((i.model_1, i.model_2) for i in items[:6]) == {("x", "y"): 2, ("x", "z"): 2, ("y", "z"): 2}
    assert (items[6].model_1, items[6].model_2) == ("x", "z")
    assert json.loads(items[6].options) | {"seed": 0} == {"max_tokens": 9, "temperature": 0, "seed": 0}
    seeds = {json.loads(i.options)["seed"] for i in items}
    assert len(seeds) == 7  # each item samples with a seed of its own
    again, same = load_study(write(tmp_path / "t.jsonl", records), ["x", "y", "z"])
    assert (again, same) == (items, digest)
    _, other = load_study(write(tmp_path / "u.jsonl", records), ["x", "y", "w", "z"])
    assert other != digest  # other models: another study


@pytest.mark.parametrize(("record", "says"), [
    ("not json", ":2: not a JSON object"), ("[1]", ":2: not a JSON object"), ({"id": "x"}, ":2: prompt must be"),
    ({"prompt": ""}, ":2: prompt must be"), ({"prompt": "x" * 20_001}, ":2: prompt must be"),
    ({"prompt": "p", "colour": 1}, ":2: unknown field 'colour'"), ({"prompt": "p", "models": ["x"]}, ":2: models"),
    ({"prompt": "p", "models": ["x", "nope"]}, ":2: models: 'nope' is not served"),
    ({"prompt": "p", "max_tokens": 0}, ":2: max_tokens"), ({"prompt": "p", "temperature": "hot"}, ":2: temperature"),
    ({"prompt": "p", "id": "1"}, ":2: id '1' is also the id of line 1"), ({"prompt": "p", "id": True}, ":2: id"),
])
def test_mistakes_name_the_line_and_field(tmp_path, record, says):
    path = write(tmp_path / "s.jsonl", [{"prompt": "first"}, record])
    with pytest.raises(ValueError, match=says.replace("[", r"\[")) as info:
        load_study(path, ["x", "y"])
    assert str(info.value).startswith(path)


def test_a_study_needs_items_and_two_models(tmp_path):
    with pytest.raises(ValueError, match="no items"):
        load_study(write(tmp_path / "s.jsonl", ["", "  "]), ["x", "y"])
    with pytest.raises(ValueError, match="two or more"):
        load_study(write(tmp_path / "t.jsonl", [{"prompt": "p"}]), ["x"])
    with pytest.raises(FileNotFoundError):
        load_study(tmp_path / "missing.jsonl", ["x", "y"])


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 9])
def test_orders_are_balanced_across_raters(n):
    rows = n if n % 2 == 0 else 2 * n
    orders = [rater_order(n, ordinal, "digest") for ordinal in range(rows)]
    assert all(sorted(o) == list(range(n)) for o in orders)
    positions = Counter((item, k) for o in orders for k, item in enumerate(o))
    assert set(positions.values()) == {rows // n}  # every item at every position equally often
    neighbours = Counter((o[k], o[k + 1]) for o in orders for k in range(n - 1))
    assert len(neighbours) == n * (n - 1) and set(neighbours.values()) == {rows // n}  # each follows each
    assert rater_order(n, rows, "digest") == orders[0]  # the design repeats
    assert williams_row(4, 0) == [0, 1, 3, 2]


def test_sides_are_random_but_stable():
    sides = [swapped("digest", f"rater{r}", f"item{i}") for r in range(20) for i in range(20)]
    assert 160 < sum(sides) < 240  # about half swapped
    assert sides == [swapped("digest", f"rater{r}", f"item{i}") for r in range(20) for i in range(20)]
