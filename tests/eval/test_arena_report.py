"""`lmforge arena report`: the statistics against a hand computation on a fixture database
(win rates, Bradley-Terry, Cohen's kappa), the bootstrap's intervals (they contain the
estimate, a seed reproduces them), and the files it writes (CSV, JSONL, PNG, JSON)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.eval.arena_report import bradley_terry, cohen_kappa, outcomes, summarize, write_report
from lmforge.eval.arena_store import ArenaStore, Battle, read_votes

# Two raters judge the same ten items comparing models A and B; labels in model terms.
R1 = ["A", "A", "A", "A", "A", "A", "B", "B", "tie", "both_bad"]
R2 = ["A", "A", "A", "A", "B", "B", "B", "A", "tie", "tie"]
PAIRS = {frozenset(("A", "B"))}


def add_vote(store: ArenaStore, rater: str, item: str, label: str, a_on_left: bool, n: int) -> None:
    """A battle of A and B (on the given sides), answered, then a vote meaning `label`."""
    model_a, model_b = ("A", "B") if a_on_left else ("B", "A")
    battle = f"{rater}-{item}-{n}"
    store.rater_ordinal(rater)
    store.add_battle(Battle(battle, rater, item, f"prompt {item}", model_a, model_b, "open"), keep_open=8)
    store.store_answers(battle, f"answer of {model_a}", f"answer of {model_b}")
    choice = label if label in ("tie", "both_bad") else "a" if label == model_a else "b"
    store.vote(battle, rater, choice, f"because {n}", PAIRS)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("arena") / "ratings.db"
    store = ArenaStore(path)
    n = 0
    for rater, labels in (("r1", R1), ("r2", R2)):
        for k, label in enumerate(labels):
            add_vote(store, rater, f"item{k}", label, a_on_left=(k + n) % 2 == 0, n=n)  # sides alternate
            n += 1
    store.close()
    return path


def test_win_rates_and_bradley_terry_by_hand(db):
    summary = summarize(read_votes(db), samples=0)
    # A preferred 6 + 5 = 11 times, B 2 + 3 = 5, ties 1 + 2 = 3, both bad 1: 20 votes.
    # Win rate of A = (11 + (3 + 1) / 2) / 20 = 0.65; B = (5 + 2) / 20 = 0.35.
    # Two models: p_A / (p_A + p_B) = W_A / n, so the strengths (summing to 1) are the win rates.
    by_model = {r["model"]: r for r in summary["models"]}
    assert by_model["A"] | {"win_rate_ci": None} == {
        "model": "A", "battles": 20, "wins": 11, "losses": 5, "ties": 3, "both_bad": 1,
        "win_rate": pytest.approx(0.65), "win_rate_ci": None, "bt_strength": pytest.approx(0.65), "bt_ci": None}
    assert by_model["B"]["win_rate"] == pytest.approx(0.35) and by_model["B"]["bt_strength"] == pytest.approx(0.35)
    assert [r["model"] for r in summary["models"]] == ["A", "B"]  # best first
    assert summary["pairwise"] == [{"model_1": "A", "model_2": "B", "votes": 20, "win_rate_1": pytest.approx(0.65)}]
    assert (summary["votes"], summary["raters"], summary["items"]) == (20, 2, 10)


def test_cohens_kappa_by_hand(db):
    # Agreement on items 0-3, 6 and 8: p_o = 6/10. Marginals r1: A .6, B .2, tie .1, both bad .1;
    # r2: A .5, B .3, tie .2, both bad 0. p_e = .30 + .06 + .02 + 0 = .38.
    kappa = (0.6 - 0.38) / (1 - 0.38)
    [row] = summarize(read_votes(db), samples=0)["agreement"]
    assert row == {"rater_1": "r1", "rater_2": "r2", "items": 10, "agreement": pytest.approx(0.6),
                   "kappa": pytest.approx(kappa)}
    # The textbook 2x2 table [[4, 1], [2, 3]]: p_o = .7, p_e = .5 * .6 + .5 * .4 = .5, kappa = .4.
    first = ["x"] * 5 + ["y"] * 5
    second = ["x"] * 4 + ["y"] + ["x"] * 2 + ["y"] * 3
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(first, first) == 1.0 and np.isnan(cohen_kappa(["x"] * 3, ["x"] * 3))


def test_bradley_terry_with_three_models():
    models = ["A", "B", "C"]

    def votes(results):  # (winner, loser) pairs, winner on the left
        return [{"model_a": w, "model_b": lo, "choice": "a"} for w, lo in results]

    # A cycle with equal margins: every model is as strong as the others.
    cycle = votes([("A", "B")] * 2 + [("B", "A")] + [("B", "C")] * 2 + [("C", "B")] + [("C", "A")] * 2 + [("A", "C")])
    np.testing.assert_allclose(bradley_terry(*outcomes(cycle, models), 3), [1 / 3] * 3, atol=1e-9)
    # Any data: the maximum-likelihood conditions W_i = sum_j n_ij p_i / (p_i + p_j) hold.
    data = votes([("A", "B")] * 5 + [("B", "A")] * 2 + [("B", "C")] * 3 + [("C", "B")] * 3 + [("A", "C")] * 4
                 + [("C", "A")])
    data.append({"model_a": "A", "model_b": "C", "choice": "tie"})
    i, j, s = outcomes(data, models)
    p = bradley_terry(i, j, s, 3)
    wins = np.zeros(3)
    expected = np.zeros(3)
    for a, b, score in zip(i, j, s):
        wins[a] += score
        wins[b] += 1 - score
        expected[a] += p[a] / (p[a] + p[b])
        expected[b] += p[b] / (p[a] + p[b])
    np.testing.assert_allclose(expected, wins, rtol=1e-8)
    assert p.sum() == pytest.approx(1.0) and p[0] > p[1] > p[2]
    # A model that never scores has strength 0; the others are still fitted.
    shut_out = votes([("A", "C")] * 3 + [("B", "C")] * 2 + [("A", "B"), ("B", "A")])
    p = bradley_terry(*outcomes(shut_out, models), 3)
    assert p[2] == 0 and p[0] == pytest.approx(p[1]) == pytest.approx(0.5)


def test_bootstrap_intervals_contain_the_estimate_and_are_seeded(db):
    votes = read_votes(db)
    first = summarize(votes, samples=300, seed=7)
    assert summarize(votes, samples=300, seed=7) == first
    other = summarize(votes, samples=300, seed=8)
    assert other["models"][0]["win_rate_ci"] != first["models"][0]["win_rate_ci"]
    for row in first["models"]:
        for key, ci in (("win_rate", "win_rate_ci"), ("bt_strength", "bt_ci")):
            low, high = row[ci]
            assert 0 <= low <= row[key] <= high <= 1 and high - low > 0.05, (row["model"], key, row[ci])
    a = first["models"][0]
    assert 0.4 < a["win_rate_ci"][0] < 0.65 < a["win_rate_ci"][1] < 0.9  # n = 20: an interval about +-0.2 wide


def test_the_report_files_and_the_command(db, tmp_path, capsys):
    try:
        main(["arena", "report", str(db), "--out", str(tmp_path / "out"), "--bootstrap", "50"])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr().out
    assert code == 0 and "| A | 20 | 11 | 5 | 3 | 1 | 0.650 |" in out and "Cohen's kappa" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["bootstrap_samples"] == 50 and report["models"][0]["model"] == "A"
    rows = list(csv.DictReader((tmp_path / "out" / "votes.csv").open()))
    lines = [json.loads(line) for line in (tmp_path / "out" / "votes.jsonl").read_text().splitlines()]
    assert len(rows) == len(lines) == 20
    assert [r["preferred"] for r in rows[:10]] == R1 and [r["preferred"] for r in lines[10:]] == R2
    assert rows[0]["answer_a"] == f"answer of {rows[0]['model_a']}" and lines[3]["reason"] == "because 3"
    png = (tmp_path / "out" / "arena.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert "arena.png" in out and not list((tmp_path / "out").glob(".*"))  # no temporary file left


def test_report_mistakes_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.db"
    ArenaStore(empty).close()
    for argv, says in ((["arena", "report", str(tmp_path / "none.db")], "no such arena database"),
                       (["arena", "report", str(empty)], "no votes yet")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and says in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="bootstrap"):
        write_report(empty, tmp_path / "x", samples=-1)
