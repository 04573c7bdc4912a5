"""The published files of the language-model benchmarks, read into prompts.

Each reader takes a dataset's own file, as its authors (or the Hugging Face copy that
lm-evaluation-harness loads) publish it, and returns `Doc`s holding the texts that
lm-evaluation-harness's task builds from each record (its doc_to_text, doc_to_choice and
doc_to_target, after its preprocessing), so that both score the same strings:

    hellaswag       hellaswag_{train,val}.jsonl: activity_label, ctx_a, ctx_b, endings, label;
                    query "<activity_label>: <ctx_a> <Ctx_b>", WikiHow's [title]/[step] brackets
                    cleaned up as lm-evaluation-harness does
    arc_*           ARC-{Easy,Challenge}-{Train,Dev,Test}.jsonl in AI2's layout (question.stem,
                    question.choices[].text/.label, answerKey) or the Hugging Face ai2_arc one
                    (question, choices.text/.label, answerKey); "Question: ...\\nAnswer:"
    piqa            {train,valid}.jsonl (goal, sol1, sol2) with {train,valid}-labels.lst beside
                    it (one 0/1 per line), or records that carry their "label"
    winogrande      winogrande_1.1 {train_*,dev}.jsonl: sentence (with one "_"), option1,
                    option2, answer "1"/"2"; partial scoring: each option fills the blank in
                    the context, the text after the blank is the scored continuation
    lambada_openai  lambada_test.jsonl: text; the last space-separated word is the target
    wikitext        wiki.{train,valid,test}.raw (WikiText-2/103 raw): one document per article,
                    split at its top-level " = Title = " heading as EleutherAI's
                    wikitext_document_level does

A missing field, a malformed line or a missing labels file raises ValueError /
FileNotFoundError naming the file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.readers import read_jsonl


@dataclass(frozen=True)
class Doc:
    """One example. queries: its prompt, or one prompt per choice (partial scoring);
    answers: the choices, or the one continuation shared by all prompts; gold: the right
    choice. record: the source record (few-shot sampling tells documents apart by it)."""

    record: dict[str, Any]
    line: int
    queries: tuple[str, ...]
    answers: tuple[str, ...]
    gold: int = 0


def _get(record: dict, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """record[name] (a dotted name reads nested objects), checked to be of `kind`."""
    value: Any = record
    for i, part in enumerate(name.split(".")):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{where}: missing field {'.'.join(name.split('.')[:i + 1])!r}")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise ValueError(f"{where}: field {name!r} holds {type(value).__name__}, expected "
                         f"{' or '.join(k.__name__ for k in kinds)}")
    return value


def _strings(record: dict, name: str, where: str) -> list[str]:
    value = _get(record, name, list, where)
    if not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: field {name!r} must be a non-empty list of strings")
    return value


def _index(value: int | str, n: int, name: str, where: str, base: int = 0) -> int:
    """A label given as an int or a digit string -> 0-based index below n."""
    i = int(value) - base if isinstance(value, int) or str(value).strip().isdigit() else -1
    if not 0 <= i < n:
        raise ValueError(f"{where}: field {name!r} = {value!r} names none of the {n} choices")
    return i


# ----------------------------------------------------------------------------- HellaSwag


def clean_hellaswag(text: str) -> str:
    """lm-evaluation-harness's HellaSwag clean-up: " [title]" -> ". ", other [brackets] (WikiHow
    markup) dropped, double spaces halved."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def read_hellaswag(path: Path) -> list[Doc]:
    docs = []
    for line, r in read_jsonl(path):
        where = f"{path}:{line}"
        context = _get(r, "ctx_a", str, where) + " " + _get(r, "ctx_b", str, where).capitalize()
        endings = _strings(r, "endings", where)
        gold = _index(_get(r, "label", (int, str), where), len(endings), "label", where)
        docs.append(Doc(r, line, (clean_hellaswag(_get(r, "activity_label", str, where) + ": " + context),),
                        tuple(clean_hellaswag(e) for e in endings), gold))
    return docs


# ----------------------------------------------------------------------------- ARC


def read_arc(path: Path) -> list[Doc]:
    """Either layout, line by line: AI2's nests the choices in the question object."""
    docs = []
    for line, r in read_jsonl(path):
        where = f"{path}:{line}"
        if isinstance(r.get("question"), dict):  # AI2's original files
            question = _get(r, "question.stem", str, where)
            choices = _get(r, "question.choices", list, where)
            if not all(isinstance(c, dict) for c in choices):
                raise ValueError(f"{where}: field 'question.choices' must be a list of {{text, label}} objects")
            texts = [_get(c, "text", str, f"{where}: question.choices[{i}]") for i, c in enumerate(choices)]
            labels = [str(_get(c, "label", (str, int), f"{where}: question.choices[{i}]"))
                      for i, c in enumerate(choices)]
        else:  # Hugging Face's ai2_arc
            question = _get(r, "question", str, where)
            texts, labels = _strings(r, "choices.text", where), _strings(r, "choices.label", where)
        key = str(_get(r, "answerKey", (str, int), where))
        if key not in labels or len(labels) != len(texts) or not texts:
            raise ValueError(f"{where}: field 'answerKey' = {key!r} is not one of the choice labels {labels}")
        docs.append(Doc(r, line, (f"Question: {question}\nAnswer:",), tuple(texts), labels.index(key)))
    return docs


# ----------------------------------------------------------------------------- PIQA


def piqa_labels_path(path: Path) -> Path:
    """valid.jsonl -> valid-labels.lst, the authors' name for the labels beside the data."""
    return path.with_name(path.name.removesuffix(".jsonl") + "-labels.lst")


def read_piqa(path: Path) -> list[Doc]:
    records = read_jsonl(path)
    labels_file = piqa_labels_path(path)
    if labels_file.is_file():
        lines = labels_file.read_text(encoding="utf-8").split()
        if len(lines) != len(records):
            raise ValueError(f"{labels_file}: {len(lines)} labels for the {len(records)} records of {path}")
        labels: list[tuple[int | str, str]] = [(v, f"{labels_file}:{i + 1}") for i, v in enumerate(lines)]
    elif all("label" in r for _, r in records):
        labels = [(r["label"], f"{path}:{line}") for line, r in records]
    else:
        raise FileNotFoundError(f"{labels_file}: no such file (PIQA's labels; or give each record of {path} "
                                "a 'label')")
    docs = []
    for (line, r), (label, label_where) in zip(records, labels):
        where = f"{path}:{line}"
        goal, sols = _get(r, "goal", str, where), (_get(r, "sol1", str, where), _get(r, "sol2", str, where))
        gold = _index(label, 2, "label", label_where)
        docs.append(Doc({**r, "label": gold}, line, (f"Question: {goal}\nAnswer:",), sols, gold))
    return docs


# ----------------------------------------------------------------------------- Winogrande


def read_winogrande(path: Path) -> list[Doc]:
    docs = []
    for line, r in read_jsonl(path):
        where = f"{path}:{line}"
        sentence = _get(r, "sentence", str, where)
        if "_" not in sentence:
            raise ValueError(f"{where}: field 'sentence' has no '_' blank to fill")
        options = (_get(r, "option1", str, where), _get(r, "option2", str, where))
        gold = _index(_get(r, "answer", (str, int), where), 2, "answer", where, base=1)
        blank = sentence.index("_")
        docs.append(Doc(r, line, tuple(sentence[:blank] + o for o in options), (sentence[blank + 1:].strip(),), gold))
    return docs


# ----------------------------------------------------------------------------- LAMBADA


def read_lambada(path: Path) -> list[Doc]:
    docs = []
    for line, r in read_jsonl(path):
        words = _get(r, "text", str, f"{path}:{line}").split(" ")
        if len(words) < 2:
            raise ValueError(f"{path}:{line}: field 'text' needs a context and a last word")
        docs.append(Doc(r, line, (" ".join(words[:-1]),), (" " + words[-1],)))
    return docs


# ----------------------------------------------------------------------------- WikiText


def _is_article_title(line: str) -> bool:
    """' = Title = ' starts an article; ' = = Section = = ' and deeper headings do not."""
    collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
    return collapsed.startswith("= ") and collapsed.endswith(" =")


def wikitext_articles(text: str) -> list[tuple[int, str]]:
    """(first line, text) of each article of a raw file: its lines from one title line to the
    next. Blank lines before the first title are dropped; the last article is kept whatever
    it holds."""
    articles, lines, start = [], [], 1
    for no, line in enumerate(text.split("\n"), 1):
        if _is_article_title(line):
            if "\n".join(lines).strip():
                articles.append((start, "\n".join(lines)))
            lines, start = [], no
        lines.append(line)
    articles.append((start, "\n".join(lines)))
    return articles


def wikitext_detokenize(page: str) -> str:
    """lm-evaluation-harness's WikiText detokenizer: undo the dataset's tokenization (" @-@ ",
    spaces around punctuation and inside brackets and quotes, "= = =" headings...) so that the
    model reads ordinary text. Word and byte counts are taken before it."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for old, new in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                     (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(old, new)
    for pattern, repl in ((r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
                          (r"{\s*([^}]*?)\s*}", r"{\1}"), (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
                          (r"'\s*([^']*?)\s*'", r"'\1'")):
        s = re.sub(pattern, repl, s)
    for old, new in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
                     (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(old, new)
    return s


def read_wikitext(path: Path) -> list[Doc]:
    """One Doc per article: record {"page": raw text}; `line` is the title's line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    docs = [Doc({"page": page}, line, (), ()) for line, page in wikitext_articles(text)]
    if not any(d.record["page"].strip() for d in docs):
        raise ValueError(f"{path}: no text")
    return docs
