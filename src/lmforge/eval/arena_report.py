"""Statistics of arena votes (`lmforge arena report DB`): win rates, Bradley-Terry scores,
rater agreement, with bootstrap intervals; a plot, and the votes as CSV and JSONL.

Every vote compares model_a (left) with model_b (right) and says a, b, tie or both_bad.
As an outcome for model_a it scores 1 (a), 0 (b) or 1/2 (tie and both bad: neither was
preferred).

- Win rate of a model: its score summed over the votes it was in, divided by their
  number: (wins + ties/2 + both_bad/2) / battles.
- Bradley-Terry: P(i is preferred to j) = p_i / (p_i + p_j), strengths p fitted by
  maximum likelihood with the MM algorithm (Hunter 2004): p_i <- W_i / sum_j n_ij / (p_i + p_j),
  W_i the model's summed score, n_ij the votes between i and j; p sums to 1. A model that
  never scored gets p = 0 (the likelihood's supremum is at the boundary then); with two
  models, p is each one's win rate.
- Intervals: 95% percentile bootstrap over the votes (resampled with replacement, a
  seeded numpy Generator, so a report is reproducible); a resample in which a model does
  not appear gives it no value (NaN) and is left out of its interval.
- Agreement: Cohen's kappa between every two raters over the items both rated, labels in
  model terms (which model was preferred, tie, both bad), so that left/right swaps do not
  count as disagreement; kappa = (p_o - p_e) / (1 - p_e).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lmforge.eval.arena_store import read_votes
from lmforge.eval.report import markdown_report, save_figure, write_metrics_json, write_text

SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
EXPORT_FIELDS = ["vote", "battle", "created", "rater", "item", "prompt", "model_a", "model_b", "choice", "preferred",
                 "reason", "answer_a", "answer_b"]


def outcomes(votes: Sequence[dict], models: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, s): index of model_a, of model_b, and model_a's score, one entry per vote."""
    index = {m: k for k, m in enumerate(models)}
    i = np.array([index[v["model_a"]] for v in votes], dtype=np.int64)
    j = np.array([index[v["model_b"]] for v in votes], dtype=np.int64)
    s = np.array([SCORE[v["choice"]] for v in votes], dtype=np.float64)
    return i, j, s


def _scores_and_counts(i: np.ndarray, j: np.ndarray, s: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """W (m,): each model's summed score; n (m, m): votes between each two models."""
    w = np.bincount(i, weights=s, minlength=m) + np.bincount(j, weights=1 - s, minlength=m)
    n = np.zeros((m, m))
    np.add.at(n, (i, j), 1)
    return w, n + n.T


def win_rates(i: np.ndarray, j: np.ndarray, s: np.ndarray, m: int) -> np.ndarray:
    """(m,) summed score / battles of each model (NaN for a model in no vote)."""
    w, n = _scores_and_counts(i, j, s, m)
    battles = n.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(battles > 0, w / battles, np.nan)


def bradley_terry(i: np.ndarray, j: np.ndarray, s: np.ndarray, m: int, iters: int = 10_000,
                  tol: float = 1e-12) -> np.ndarray:
    """(m,) Bradley-Terry strengths summing to 1, by MM iterations (NaN for a model in no vote)."""
    w, n = _scores_and_counts(i, j, s, m)
    present = n.sum(axis=1) > 0
    p = np.where(present, 1.0, 0.0)
    p /= max(p.sum(), 1.0)
    for _ in range(iters):
        pair_sum = p[:, None] + p[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            denom = np.where(n > 0, n / np.where(pair_sum > 0, pair_sum, 1.0), 0.0).sum(axis=1)
            new = np.where(present & (denom > 0), w / np.where(denom > 0, denom, 1.0), 0.0)
        new /= max(new.sum(), 1e-300)
        done = np.max(np.abs(new - p)) < tol
        p = new
        if done:
            break
    return np.where(present, p, np.nan)


def bootstrap(i: np.ndarray, j: np.ndarray, s: np.ndarray, m: int, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Each statistic over `samples` resamples of the votes: {"win_rate", "bt"}, each (samples, m)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"win_rate": [], "bt": []}
    for _ in range(samples):
        k = rng.integers(0, len(s), len(s))
        out["win_rate"].append(win_rates(i[k], j[k], s[k], m))
        out["bt"].append(bradley_terry(i[k], j[k], s[k], m, iters=2000, tol=1e-9))
    return {name: np.array(v).reshape(samples, m) for name, v in out.items()}


def interval(values: np.ndarray) -> list[float | None]:
    """The 2.5th and 97.5th percentiles of each column, ignoring NaN (None when all are NaN)."""
    out = []
    for col in values.T:
        col = col[np.isfinite(col)]
        out.append([float(np.percentile(col, 2.5)), float(np.percentile(col, 97.5))] if len(col) else None)
    return out


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float:
    """Cohen's kappa of two raters' labels on the same items (NaN when chance agreement is 1)."""
    if len(first) != len(second) or not first:
        raise ValueError("kappa needs two equally long, non-empty lists of labels")
    labels = sorted(set(first) | set(second))
    n = len(first)
    p_o = sum(a == b for a, b in zip(first, second)) / n
    p_e = sum((first.count(c) / n) * (second.count(c) / n) for c in labels)
    return float("nan") if p_e == 1 else (p_o - p_e) / (1 - p_e)


def preferred(vote: dict) -> str:
    """A vote in model terms: the preferred model's name, "tie" or "both_bad"."""
    return {"a": vote["model_a"], "b": vote["model_b"]}.get(vote["choice"], vote["choice"])


def agreement(votes: Sequence[dict]) -> list[dict[str, Any]]:
    """Cohen's kappa of every two raters who rated items in common."""
    by_rater: dict[str, dict[str, str]] = {}
    for v in votes:
        by_rater.setdefault(v["rater"], {})[v["item"]] = preferred(v)
    rows = []
    for r1, r2 in itertools.combinations(sorted(by_rater), 2):
        common = sorted(set(by_rater[r1]) & set(by_rater[r2]))
        if not common:
            continue
        a, b = [by_rater[r1][c] for c in common], [by_rater[r2][c] for c in common]
        kappa = cohen_kappa(a, b)
        rows.append({"rater_1": r1, "rater_2": r2, "items": len(common),
                     "agreement": sum(x == y for x, y in zip(a, b)) / len(common),
                     "kappa": None if math.isnan(kappa) else kappa})
    return rows


def summarize(votes: Sequence[dict], samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every statistic of the module's docstring, as a JSON-ready dict."""
    if not votes:
        raise ValueError("no votes to report on")
    models = sorted({v["model_a"] for v in votes} | {v["model_b"] for v in votes})
    m = len(models)
    i, j, s = outcomes(votes, models)
    rates, p = win_rates(i, j, s, m), bradley_terry(i, j, s, m)
    boot = bootstrap(i, j, s, m, samples, seed) if samples else None
    rows = []
    for k, model in enumerate(models):
        mine = [v for v in votes if model in (v["model_a"], v["model_b"])]
        won = sum(1 for v in mine if preferred(v) == model)
        ties = sum(1 for v in mine if v["choice"] == "tie")
        bad = sum(1 for v in mine if v["choice"] == "both_bad")
        rows.append({"model": model, "battles": len(mine), "wins": won, "losses": len(mine) - won - ties - bad,
                     "ties": ties, "both_bad": bad, "win_rate": float(rates[k]),
                     "win_rate_ci": interval(boot["win_rate"])[k] if boot else None,
                     "bt_strength": float(p[k]), "bt_ci": interval(boot["bt"])[k] if boot else None})
    rows.sort(key=lambda r: -r["bt_strength"])
    pairwise = []
    for a, b in itertools.combinations(models, 2):
        between = [v for v in votes if {v["model_a"], v["model_b"]} == {a, b}]
        if between:
            score = sum(SCORE[v["choice"]] if v["model_a"] == a else 1 - SCORE[v["choice"]] for v in between)
            pairwise.append({"model_1": a, "model_2": b, "votes": len(between), "win_rate_1": score / len(between)})
    return {"votes": len(votes), "raters": len({v["rater"] for v in votes}), "items": len({v["item"] for v in votes}),
            "bootstrap_samples": samples, "seed": seed, "models": rows, "pairwise": pairwise,
            "agreement": agreement(votes)}


def plot(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    """Win rates and Bradley-Terry ratings with their intervals, best model on top."""
    rows = summary["models"][::-1]
    names = [r["model"] for r in rows]
    fig = Figure(figsize=(10, 1.2 + 0.45 * len(rows)))
    for ax, key, ci, label in ((fig.add_subplot(1, 2, 1), "win_rate", "win_rate_ci", "win rate (ties count 1/2)"),
                               (fig.add_subplot(1, 2, 2), "bt_strength", "bt_ci", "Bradley-Terry strength")):
        values = np.array([r[key] for r in rows], dtype=float)
        lows = np.array([(r[ci] or [v, v])[0] for r, v in zip(rows, values)])
        highs = np.array([(r[ci] or [v, v])[1] for r, v in zip(rows, values)])
        ax.barh(names, values, color="#2d5bd7", alpha=0.8)
        ax.errorbar(values, names, xerr=[values - lows, highs - values], fmt="none", ecolor="black", capsize=3)
        ax.set_xlabel(label + " (95% bootstrap interval)")
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"arena: {summary['votes']} votes, {summary['raters']} raters")
    return save_figure(fig, path)


def _export_rows(votes: Sequence[dict]) -> list[dict[str, Any]]:
    return [{**{k: v.get(k) for k in EXPORT_FIELDS if k != "preferred"}, "preferred": preferred(v)} for v in votes]


def write_report(db: str | os.PathLike, out: str | os.PathLike, samples: int = 1000, seed: int = 0) -> list[Path]:
    """Read an arena database and write report.json, report.md, arena.png, votes.csv and
    votes.jsonl into `out` (each atomically); the paths written."""
    if samples < 0:
        raise ValueError(f"--bootstrap must be 0 or more, got {samples}")
    votes = read_votes(db)
    if not votes:
        raise ValueError(f"{db}: no votes yet")
    summary = summarize(votes, samples, seed)
    out = Path(out)
    rows = _export_rows(votes)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = [write_metrics_json(out / "report.json", summary),
             write_text(out / "report.md", markdown_report(f"Arena report: {Path(db).name}", _sections(summary))),
             plot(summary, out / "arena.png"), write_text(out / "votes.csv", text.getvalue()),
             write_text(out / "votes.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))]
    return paths


def _sections(summary: dict[str, Any]) -> dict[str, Any]:
    def ci(pair: list[float] | None, fmt: str) -> str:
        return "–" if pair is None else f"{pair[0]:{fmt}} – {pair[1]:{fmt}}"

    models = [{"model": r["model"], "battles": r["battles"], "wins": r["wins"], "losses": r["losses"],
               "ties": r["ties"], "both bad": r["both_bad"], "win rate": f"{r['win_rate']:.3f}",
               "95% CI": ci(r["win_rate_ci"], ".3f"), "BT strength": f"{r['bt_strength']:.3f}",
               "BT 95% CI": ci(r["bt_ci"], ".3f")} for r in summary["models"]]
    sections: dict[str, Any] = {
        "Votes": f"{summary['votes']} votes by {summary['raters']} raters on {summary['items']} items; intervals "
                 f"from {summary['bootstrap_samples']} bootstrap resamples (seed {summary['seed']}).",
        "Models": models}
    if summary["pairwise"]:
        sections["Pairs"] = summary["pairwise"]
    sections["Rater agreement (Cohen's kappa)"] = summary["agreement"] or "No two raters rated the same item."
    return sections
