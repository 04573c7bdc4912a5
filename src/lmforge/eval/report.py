"""Writing evaluation results: metrics JSON, a confusion-matrix picture and a short
Markdown report. Every file is written atomically (a temporary file in the same folder,
then a rename), so a reader never sees half a report and a crash never leaves one.

Pictures use matplotlib's object API on a bare `Figure` (the Agg renderer), never
pyplot: no global backend switch, no display needed, nothing leaks between calls.
matplotlib is imported by the function that draws, so that importing this module (as
every task does) needs no matplotlib until a picture is asked for.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmforge.files import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically; returns the path."""
    atomic_write_text(path, text)
    return Path(path)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def _jsonable(obj):
    """numpy and torch scalars/arrays -> Python numbers/lists (json's `default` hook)."""
    if hasattr(obj, "tolist"):  # np.ndarray, np.generic, torch.Tensor
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"metrics value of type {type(obj).__name__} is not JSON serialisable")


def write_metrics_json(path: str | os.PathLike, metrics: Mapping) -> Path:
    """Write a metrics dict as indented JSON, atomically. numpy/torch values become plain
    numbers and lists; non-finite floats are written as NaN/Infinity (Python's json reads them)."""
    text = json.dumps(metrics, indent=2, default=_jsonable, ensure_ascii=False) + "\n"
    return write_text(path, text)


def confusion_matrix_png(matrix, label_names: Sequence[str], path: str | os.PathLike, *,
                         normalize: bool = False, title: str | None = None) -> Path:
    """Heatmap of a (K, K) confusion matrix (rows = true class, columns = predicted), each
    cell labelled with its count (or, with normalize=True, its share of the true class)."""
    cm = np.asarray(matrix, dtype=np.float64)
    k = len(label_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {cm.shape}, expected ({k}, {k}) for {k} label names")
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    side = max(4.0, 0.5 * k + 2)
    from matplotlib.figure import Figure  # only when drawing (see the module docstring)

    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=list(label_names), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(label_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if k <= 30:  # past that the numbers are unreadable anyway
        top = shown.max() if shown.size else 0
        for i in range(k):
            for j in range(k):
                text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if top and shown[i, j] > top / 2 else "black")
    return save_figure(fig, path)


def _cell(value) -> str:
    if isinstance(value, float | np.floating):
        value = float(value)
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e6 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _section_body(body) -> str:
    if isinstance(body, str):
        return body
    if isinstance(body, Mapping):
        if body and all(isinstance(v, Mapping) for v in body.values()):  # e.g. per_class
            cols = list(dict.fromkeys(c for v in body.values() for c in v))
            return _table(["", *cols], [[k, *(v.get(c, "") for c in cols)] for k, v in body.items()])
        return _table(["metric", "value"], [[k, v] for k, v in body.items()])
    if isinstance(body, Sequence) and body and all(isinstance(r, Mapping) for r in body):
        cols = list(dict.fromkeys(c for r in body for c in r))
        return _table(cols, [[r.get(c, "") for c in cols] for r in body])
    raise ValueError(f"a report section must be a string, a mapping or a list of mappings, got {type(body).__name__}")


def markdown_report(title: str, sections: Mapping[str, object]) -> str:
    """A short Markdown report: `# title`, then one `## heading` per section.

    sections: {heading: body}, in order; a body is a string (written as is), a flat mapping
    (a metric/value table), a mapping of mappings (one row per key, e.g. per-class scores)
    or a list of mappings (one row each). Floats are shown with 4 decimals.
    """
    parts = [f"# {title}"]
    for heading, body in sections.items():
        parts.append(f"## {heading}\n\n{_section_body(body)}")
    return "\n\n".join(parts) + "\n"
