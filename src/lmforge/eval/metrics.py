"""Task metrics, computed the way the field computes them.

    classification   accuracy, per-class precision/recall/F1, macro F1, confusion matrix (numpy)
    multi-label      micro/macro F1, subset accuracy, Hamming loss (numpy)
    NER              entity-level precision/recall/F1 through seqeval (strict mode)
    extractive QA    exact match and F1 exactly as the official SQuAD v1.1/v2.0 script
    generation       ROUGE-1/2/L/Lsum through rouge-score, BLEU and chrF through sacrebleu
    language models  perplexity, bits per character / byte from summed negative log-likelihoods

Scales follow each metric's own convention, so numbers compare with published ones:
classification and NER scores are fractions in [0, 1] (scikit-learn, seqeval); SQuAD,
ROUGE, BLEU and chrF are percentages in [0, 100] (their official scripts).
"""

from __future__ import annotations

import importlib
import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import sacrebleu

LN2 = math.log(2.0)


# ---------------------------------------------------------------- classification

def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 per class; 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    return precision, recall, f1


def _label_indices(labels: Sequence, names: list[str], what: str) -> np.ndarray:
    """Map labels given as indices or as names to indices into `names`."""
    index = {name: i for i, name in enumerate(names)}
    out = np.empty(len(labels), dtype=np.int64)
    for n, label in enumerate(labels):
        if isinstance(label, str):
            if label not in index:
                raise ValueError(f"{what}[{n}] = {label!r} is not one of the label names {names}")
            out[n] = index[label]
        else:
            i = int(label)
            if not 0 <= i < len(names):
                raise ValueError(f"{what}[{n}] = {i} is outside the {len(names)} labels {names}")
            out[n] = i
    return out


def classification_metrics(y_true: Sequence, y_pred: Sequence, label_names: Sequence[str] | None = None) -> dict:
    """Single-label classification scores.

    y_true, y_pred: one label per example, as class indices or as names from `label_names`.
    label_names: the class names, in index order; None: classes 0..max(label) named "0", "1", ...
    Returns {"accuracy", "macro_f1", "weighted_f1", "n", "per_class": {name: {"precision",
    "recall", "f1", "support"}}, "confusion_matrix": rows = true class, columns = predicted}.
    macro_f1 averages over the classes that occur in y_true or y_pred (scikit-learn's rule
    when it infers the labels), so a class absent from the evaluation set does not count as 0.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("classification_metrics needs at least one example")
    if label_names is None:
        if any(isinstance(x, str) for x in (*y_true, *y_pred)):
            raise ValueError("labels are strings: pass label_names to give their order")
        label_names = [str(i) for i in range(int(max(max(y_true), max(y_pred))) + 1)]
    names = list(label_names)
    t = _label_indices(y_true, names, "y_true")
    p = _label_indices(y_pred, names, "y_pred")
    k = len(names)
    cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)  # (true, predicted)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    precision, recall, f1 = _prf(tp, cm.sum(axis=0) - tp, support - tp)
    present = (support > 0) | (cm.sum(axis=0) > 0)
    return {
        "accuracy": float(tp.sum() / len(t)),
        "macro_f1": float(f1[present].mean()),
        "weighted_f1": float((f1 * support).sum() / support.sum()),
        "n": len(t),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(names)
        },
        "confusion_matrix": cm.tolist(),
    }


def multilabel_metrics(y_true, y_pred, label_names: Sequence[str] | None = None) -> dict:
    """Multi-label classification scores from indicator matrices.

    y_true, y_pred: (N, L) 0/1 (or bool) arrays, one column per label.
    Returns {"micro_f1", "micro_precision", "micro_recall", "macro_f1", "subset_accuracy"
    (every label of an example right), "hamming_loss" (fraction of wrong cells), "n",
    "per_class": {name: {"precision", "recall", "f1", "support"}}}. macro_f1 averages over
    labels that occur in y_true or y_pred.
    """
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.ndim != 2 or t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must be (N, L) indicator matrices of one shape, got "
                         f"{t.shape} and {p.shape}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0/1 (or bool) values")
    if t.shape[0] == 0:
        raise ValueError("multilabel_metrics needs at least one example")
    names = list(label_names) if label_names is not None else [str(i) for i in range(t.shape[1])]
    if len(names) != t.shape[1]:
        raise ValueError(f"{len(names)} label_names for {t.shape[1]} label columns")
    t, p = t.astype(bool), p.astype(bool)
    tp = (t & p).sum(axis=0).astype(np.float64)
    fp = (~t & p).sum(axis=0).astype(np.float64)
    fn = (t & ~p).sum(axis=0).astype(np.float64)
    precision, recall, f1 = _prf(tp, fp, fn)
    micro_p, micro_r, micro_f1 = (float(x[0]) for x in _prf(tp.sum(keepdims=True), fp.sum(keepdims=True),
                                                             fn.sum(keepdims=True)))
    present = (t.sum(axis=0) > 0) | (p.sum(axis=0) > 0)
    return {
        "micro_f1": micro_f1,
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "subset_accuracy": float((t == p).all(axis=1).mean()),
        "hamming_loss": float((t != p).mean()),
        "n": int(t.shape[0]),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(t[:, i].sum())}
            for i, name in enumerate(names)
        },
    }


# ---------------------------------------------------------------- NER

SCHEMES = ("IOB2", "IOE2", "IOBES", "BILOU")


def _seqeval(module: str):
    """A seqeval module, imported on first use (as rouge-score below): seqeval pulls in
    scikit-learn and rouge-score nltk, each adding about two seconds to the start of every
    lmforge command otherwise."""
    return importlib.import_module(f"seqeval.{module}")


def _check_tags(sentences: Sequence[Sequence[str]], scheme_cls: type, what: str) -> None:
    """seqeval fails on a malformed tag with a bare KeyError; name the sentence and token instead."""
    prefixes = _seqeval("scheme").Prefixes
    for s, sentence in enumerate(sentences):
        for i, tag in enumerate(sentence):
            if tag == "O":
                continue
            prefix, sep, entity = tag.partition("-")
            ok = sep and entity and prefix in prefixes and prefixes[prefix] in scheme_cls.allowed_prefix
            if not ok:
                allowed = [p for p, flag in prefixes.items()
                           if p not in ("O", "ANY") and flag in scheme_cls.allowed_prefix]
                raise ValueError(f"{what}[{s}][{i}] = {tag!r} is not valid in the {scheme_cls.__name__} scheme "
                                 f"('O' or PREFIX-TYPE, PREFIX one of {allowed})")


def ner_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]], scheme: str = "IOB2") -> dict:
    """Entity-level NER scores through seqeval, in strict mode.

    true_tags, pred_tags: one list of tags per sentence, e.g. ["B-PER", "I-PER", "O"].
    scheme: "IOB2" (default), "IOE2", "IOBES" or "BILOU".
    Strict mode: an entity counts only when its span and type match exactly AND it is
    well-formed under the scheme; an "I-PER" that follows "O" starts no entity (the
    default conlleval-compatible mode would silently repair it into one). Strict is what
    a model's tagging must earn; it can score slightly lower than conlleval.
    Returns {"precision", "recall", "f1"} (micro over entities), "accuracy" (token level),
    "per_type": {TYPE: {"precision", "recall", "f1", "support"}}.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    if len(true_tags) != len(pred_tags):
        raise ValueError(f"true_tags has {len(true_tags)} sentences but pred_tags has {len(pred_tags)}")
    for s, (t, p) in enumerate(zip(true_tags, pred_tags)):
        if len(t) != len(p):
            raise ValueError(f"sentence {s}: {len(t)} true tags but {len(p)} predicted tags")
    scheme_cls = getattr(_seqeval("scheme"), scheme)
    true_tags, pred_tags = [list(t) for t in true_tags], [list(p) for p in pred_tags]
    _check_tags(true_tags, scheme_cls, "true_tags")
    _check_tags(pred_tags, scheme_cls, "pred_tags")
    report = _seqeval("metrics").classification_report(true_tags, pred_tags, mode="strict", scheme=scheme_cls,
                                                   output_dict=True, zero_division=0)
    micro = report.pop("micro avg")
    for key in ("macro avg", "weighted avg"):
        report.pop(key, None)
    n_tokens = sum(len(t) for t in true_tags)
    correct = sum(a == b for t, p in zip(true_tags, pred_tags) for a, b in zip(t, p))
    return {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "accuracy": correct / n_tokens if n_tokens else 0.0,
        "per_type": {
            kind: {"precision": float(r["precision"]), "recall": float(r["recall"]), "f1": float(r["f1-score"]),
                   "support": int(r["support"])}
            for kind, r in sorted(report.items())
        },
    }


# ---------------------------------------------------------------- extractive QA (SQuAD)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """The official SQuAD normalisation: lowercase, drop punctuation, drop the articles
    a/an/the, collapse whitespace (in that order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def squad_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def squad_f1(gold: str, pred: str) -> float:
    """Token-overlap F1 of two answers after normalisation (the SQuAD v2.0 rule: if either
    is empty, 1 when both are, else 0)."""
    gold_toks, pred_toks = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str] | str]) -> dict:
    """Exact match and F1 as the official SQuAD v1.1 / v2.0 evaluation scripts define them.

    predictions: {question id: predicted answer text} ("" = the model says no answer).
    references: {question id: gold answer texts}; an empty list (or only answers that
        normalise to "") marks an unanswerable SQuAD 2.0 question, for which only an empty
        prediction is right.
    Each question scores the max over its gold answers; scores are percentages. Returns
    {"exact_match", "f1", "total"} and, when the set holds both answerable and unanswerable
    questions, the same three for each as "HasAns_*" and "NoAns_*". On data without
    unanswerable questions the numbers equal the v1.1 script's. Every reference id needs a
    prediction (a missing one raises ValueError rather than silently shrinking the set);
    predictions for ids not in the references are ignored, as the official scripts do.
    """
    if not references:
        raise ValueError("squad_metrics needs at least one reference question")
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} question(s) have no prediction, e.g. {missing[:5]}")
    exact: dict[str, list[float]] = {"HasAns": [], "NoAns": []}
    f1: dict[str, list[float]] = {"HasAns": [], "NoAns": []}
    for qid, answers in references.items():
        answers = [answers] if isinstance(answers, str) else list(answers)
        pred = predictions[qid]
        if not isinstance(pred, str):
            raise ValueError(f"prediction for question {qid!r} must be a string, got {type(pred).__name__}")
        gold = [a for a in answers if normalize_answer(a)] or [""]
        split = "HasAns" if gold != [""] else "NoAns"
        exact[split].append(max(squad_exact(a, pred) for a in gold))
        f1[split].append(max(squad_f1(a, pred) for a in gold))

    def summary(ex: list[float], f: list[float]) -> tuple[float, float, int]:
        return 100.0 * sum(ex) / len(ex), 100.0 * sum(f) / len(f), len(ex)

    out: dict = {}
    out["exact_match"], out["f1"], out["total"] = summary(exact["HasAns"] + exact["NoAns"], f1["HasAns"] + f1["NoAns"])
    if exact["HasAns"] and exact["NoAns"]:
        for split in ("HasAns", "NoAns"):
            ex, f, n = summary(exact[split], f1[split])
            out.update({f"{split}_exact_match": ex, f"{split}_f1": f, f"{split}_total": n})
    return out


# ---------------------------------------------------------------- generation

def _as_reference_lists(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("need at least one prediction")
    out = []
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must be a string or a non-empty list of strings")
        out.append(refs)
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise ValueError(f"predictions[{i}] must be a string, got {type(pred).__name__}")
    return out


def rouge_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE F-measures x100 over the examples, through Google's rouge-score with
    Porter stemming (the setting of the summarisation literature).

    references: one string per prediction, or a list of them (the best-scoring one counts,
    per ROUGE type). rougeLsum treats newlines as sentence boundaries (put one sentence per
    line for summaries); on single-line texts it equals rougeL. rouge-score's tokenizer
    keeps only [a-z0-9] runs, so it is meant for English.
    Returns {"rouge1", "rouge2", "rougeL", "rougeLsum"}.
    """
    refs = _as_reference_lists(predictions, references)
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = importlib.import_module("rouge_score.rouge_scorer").RougeScorer(types, use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for pred, gold in zip(predictions, refs):
        scores = scorer.score_multi(gold, pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: 100.0 * totals[t] / len(predictions) for t in types}


def bleu_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                tokenize: str = "13a") -> dict[str, float]:
    """Corpus BLEU and chrF through sacrebleu (its defaults: 13a tokenisation, chrF with
    character 6-grams and beta 2), as percentages.

    references: one string per prediction, or a list per prediction (their counts may
    differ). tokenize: sacrebleu's BLEU tokenizer ("13a", "intl", "zh", "char", "none", ...).
    Returns {"bleu", "chrf"}.
    """
    refs = _as_reference_lists(predictions, references)
    n_streams = max(len(r) for r in refs)
    # sacrebleu takes reference *streams* (the k-th reference of every segment); None
    # marks a segment with fewer references.
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_streams)]
    bleu = sacrebleu.corpus_bleu(list(predictions), streams, tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(list(predictions), streams)
    return {"bleu": float(bleu.score), "chrf": float(chrf.score)}


# ---------------------------------------------------------------- language modelling

def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood in nats per token); inf past float range."""
    if math.isnan(mean_nll):
        raise ValueError("mean_nll is NaN")
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def bits_per_char(total_nll_nats: float, n_chars: int) -> float:
    """Summed NLL (nats) over a text / ln 2 / its characters: unlike perplexity, this
    does not depend on the tokenizer, so models with different vocabularies compare."""
    if n_chars <= 0:
        raise ValueError(f"n_chars must be positive, got {n_chars}")
    return total_nll_nats / LN2 / n_chars


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """Summed NLL (nats) / ln 2 / UTF-8 bytes of the text (the usual unit for byte-level models)."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}")
    return total_nll_nats / LN2 / n_bytes


# ---------------------------------------------------------------- standard errors (lm-evaluation-harness's)

def sample_stddev(values: Sequence[float]) -> float:
    """Standard deviation with Bessel's correction (n - 1 in the denominator)."""
    mu = sum(values) / len(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (len(values) - 1))


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of a mean: sample_stddev / sqrt(n); None for fewer than 2 values."""
    return sample_stddev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def bootstrap_stderr(values: Sequence[float], statistic, iters: int = 100_000) -> float | None:
    """Bootstrap standard error of `statistic`, reproducing lm-evaluation-harness's draws.

    statistic: (R, n) resamples -> (R,) values, e.g. perplexity ``lambda x: np.exp(-x.mean(1))``.
    lm-evaluation-harness draws chunks of min(1000, iters) resamples, chunk i with
    random.Random(i).choices(values, k=n). numpy's RandomState([i]) produces the same
    Mersenne Twister stream and choices() picks floor(random() * n), so the same resamples
    come out here, vectorised. None for fewer than 2 values or iters < 1.
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n < 2 or iters < 1:
        return None
    chunk = min(1000, iters)
    block = max(1, (1 << 22) // n)  # resamples per draw: ~32 MiB of uniforms at a time
    stats = []
    for i in range(iters // chunk):
        rng = np.random.RandomState([i])
        for start in range(0, chunk, block):
            u = rng.random_sample((min(block, chunk - start), n))
            stats.append(statistic(x[np.floor(u * float(n)).astype(np.int64)]))
    return float(np.std(np.concatenate(stats), ddof=1))
