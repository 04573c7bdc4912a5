"""Task data in the forms Hugging Face users keep it: Parquet files, `datasets` save_to_disk
directories and Hub dataset ids.

A task's --train / --valid / --data may name, besides the CSV/TSV/JSONL/CoNLL/SQuAD files
of lmforge.data.readers:

    data/train.parquet              a Parquet file (read with pyarrow; `datasets` not needed)
    data/agnews                     a directory written by Dataset.save_to_disk
    data/agnews:train               one split of a DatasetDict.save_to_disk directory
    fancyzhx/ag_news:train          a Hub dataset id and split (datasets.load_dataset)
    wmt16:de-en:train[:2000]        ... with a configuration, and a split slice

Local paths win over Hub ids, and a Hub id always names its split, so a mistyped file name is
never sent to the Hub. Hub ids go through `datasets` (the optional extra lmforge[data]),
which keeps its cache and honours HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 and
HF_DATASETS_CACHE. ClassLabel columns (AG News' label, WNUT-17's ner_tags) come back as
their names. `columns` renames columns for the task ("sentence=text,coarse_label=label");
a column that is not there is an error naming it and the ones that are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SPLIT = r"[\w.-]+(?:\[[^\]]*\])?(?:\+[\w.-]+(?:\[[^\]]*\])?)*"
_HUB = re.compile(rf"^(?P<id>[\w.-]+(?:/[\w.-]+)?)(?::(?P<config>[\w.-]+))?:(?P<split>{_SPLIT})$")
_ON_DISK = re.compile(rf"^(?P<path>.+):(?P<split>{_SPLIT})$")
BATCH = 1024


def _is_saved(path: Path) -> bool:
    """A directory written by save_to_disk: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def is_dataset_source(source: str | Path) -> bool:
    """Does `source` name a Parquet file, a save_to_disk directory (and split) or a Hub id:split?"""
    text = str(source)
    path = Path(text)
    if path.exists():
        return path.suffix.lower() == ".parquet" or _is_saved(path)
    on_disk = _ON_DISK.match(text)
    if on_disk and _is_saved(Path(on_disk["path"])):
        return True
    return _HUB.match(text) is not None


def parse_columns(columns: str | Mapping[str, str] | None) -> dict[str, str]:
    """FinetuneConfig.columns ("old=new,old2=new2" or a mapping) -> {old: new}."""
    if not columns:
        return {}
    if isinstance(columns, Mapping):
        return dict(columns)
    out = {}
    for item in columns.split(","):
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"columns: expected OLD=NEW pairs separated by commas, got {item!r}")
        out[old.strip()] = new.strip()
    return out


# ----------------------------------------------------------------------------- opening


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError("reading save_to_disk directories and Hub datasets needs the `datasets` package: "
                         "pip install 'lmforge[data]'") from None
    return datasets


def _class_names(features: dict[str, Any]) -> dict[str, list[str]]:
    """ClassLabel names per column (a ClassLabel, or a list/sequence of them), from the JSON form
    of `datasets` features (Features.to_dict(), or the 'huggingface' metadata of a Parquet file)."""
    out = {}
    for name, spec in features.items():
        inner = spec.get("feature", spec) if isinstance(spec, dict) else None
        if isinstance(inner, dict) and inner.get("_type") == "ClassLabel" and inner.get("names"):
            out[name] = list(inner["names"])
    return out


@dataclass
class Table:
    """Rows of a dataset source: its column names, ClassLabel names, and batches as dicts of lists."""

    name: str
    column_names: list[str]
    class_names: dict[str, list[str]]
    _batches: Any  # (columns) -> Iterator[dict[str, list]]

    def batches(self, columns: list[str]) -> Iterator[dict[str, list]]:
        return self._batches(columns)


def _parquet(path: Path) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    meta = (pf.schema_arrow.metadata or {}).get(b"huggingface")
    features = json.loads(meta).get("info", {}).get("features", {}) if meta else {}

    def batches(columns: list[str]) -> Iterator[dict[str, list]]:
        try:
            for batch in pf.iter_batches(columns=columns, batch_size=BATCH):
                yield batch.to_pydict()
        except pa.ArrowException as e:
            raise ValueError(f"{path}: cannot read Parquet data ({e})") from None

    return Table(str(path), list(pf.schema_arrow.names), _class_names(features), batches)


def _from_dataset(name: str, ds: Any) -> Table:
    def batches(columns: list[str]) -> Iterator[dict[str, list]]:
        yield from ds.select_columns(columns).iter(batch_size=BATCH)

    return Table(name, list(ds.column_names), _class_names(ds.features.to_dict()), batches)


def _saved(path: Path, split: str | None, name: str) -> Table:
    datasets = _datasets()
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{name}: holds the splits {', '.join(loaded)}; name one: {path}:SPLIT")
        if split not in loaded:
            raise ValueError(f"{name}: no split {split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    elif split is not None:
        raise ValueError(f"{name}: a single dataset without splits; name the directory alone")
    return _from_dataset(name, loaded)


def _hub(dataset_id: str, config: str | None, split: str, name: str) -> Table:
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(dataset_id, config, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        message = " ".join(str(e).split())
        raise ValueError(f"{name}: cannot load Hub dataset {dataset_id!r} split {split!r}: {message}") from None
    return _from_dataset(name, ds)


def open_table(source: str | Path) -> Table:
    """The rows of a dataset source (see the module docstring)."""
    text = str(source)
    path = Path(text)
    if path.exists():
        return _parquet(path) if path.suffix.lower() == ".parquet" else _saved(path, None, text)
    on_disk = _ON_DISK.match(text)
    if on_disk and _is_saved(Path(on_disk["path"])):
        return _saved(Path(on_disk["path"]), on_disk["split"], text)
    hub = _HUB.match(text)
    if hub is None:
        raise FileNotFoundError(f"{text}: no such file, directory or Hub dataset (a Hub id names its split: "
                                "ID:SPLIT)")
    return _hub(hub["id"], hub["config"], hub["split"], text)


# ----------------------------------------------------------------------------- rows


def _physical(table: Table, wanted: Sequence[str | int], rename: dict[str, str]) -> list[str]:
    """The table's column for each column a task asks for (by its name after `rename`, or by
    index). A rename whose column is absent is skipped (train and valid may differ), but named
    when the column it was meant to provide is missing."""
    shown = [rename.get(c, c) for c in table.column_names]
    out = []
    for want in wanted:
        if isinstance(want, int):
            if not -len(shown) <= want < len(shown):
                raise ValueError(f"{table.name}: column index {want} out of range ({len(shown)} columns)")
            out.append(table.column_names[want])
        elif want in shown:
            out.append(table.column_names[shown.index(want)])
        else:
            meant = [old for old, new in rename.items() if new == want]
            hint = (f"; --columns renames {meant[0]!r} to it, which is not there either" if meant
                    else f"; rename one with --columns OLD={want}")
            raise ValueError(f"{table.name}: no column {want!r} (columns: {', '.join(shown)}){hint}")
    return out


def _decode(value: Any, names: list[str] | None) -> Any:
    """A ClassLabel id (or a list of them) -> its name(s); other values as they are."""
    if names is None:
        return value
    if isinstance(value, list):
        return [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in value]
    return names[value] if isinstance(value, int) and 0 <= value < len(names) else value


def iter_rows(table: Table, wanted: Sequence[str | int] | None,
              rename: Mapping[str, str] | None = None) -> Iterator[tuple[str, list[Any] | dict[str, Any]]]:
    """("[i]", the row's values of `wanted` columns in that order) per row, ClassLabels decoded;
    wanted=None: ("[i]", the whole row as a dict under the renamed column names)."""
    rename = dict(rename or {})
    columns = _physical(table, [rename.get(c, c) for c in table.column_names] if wanted is None else list(wanted),
                        rename)
    i = 0
    for batch in table.batches(list(dict.fromkeys(columns))):
        n = len(next(iter(batch.values()))) if batch else 0
        decoded = {c: [_decode(v, table.class_names.get(c)) for v in batch[c]] for c in batch}
        for j in range(n):
            if wanted is None:
                yield f"[{i}]", {rename.get(c, c): decoded[c][j] for c in columns}
            else:
                yield f"[{i}]", [decoded[c][j] for c in columns]
            i += 1
