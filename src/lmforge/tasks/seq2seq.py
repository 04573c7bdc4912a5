"""summarize and translate: sequence-to-sequence fine-tuning of an encoder-decoder (BART, T5, the
original Transformer) or a decoder-only model (GPT-2, Llama), scored on generated text.

    data            JSONL / TSV / CSV with a source and a target field (source_field /
                    target_field; DialogSum: dialogue, summary), or line-aligned parallel
                    files PREFIX.SRC / PREFIX.TGT (source_lang / target_lang; Multi30k:
                    train.de, train.en with --train data/multi30k/train)
    encoder-decoder the source (the tokenizer's special tokens included, e.g. BART's <s> ... </s>,
                    T5's ... </s>; after source_prefix, e.g. T5's "summarize: ") goes to the
                    encoder; the decoder is trained by teacher forcing on the
                    target + EOS: decoder input = labels shifted right behind
                    decoder_start_token_id, labels -100 at padding (the `denoise` objective)
    decoder-only    one sequence: PROMPT then " " + target + EOS, the prompt being a template
                    with {source} (summarize: "{source}\\n\\nTL;DR:", the GPT-2 paper's cue;
                    translate: "Translate: {source}\\n=>"); the loss covers only the target
                    tokens and the EOS, so the model learns to answer and to stop, never to
                    write prompts. The prompt is tokenized as one string, exactly as a user's
                    `LM.generate(prompt)` tokenizes it; an over-long source is cut (in
                    characters, at a token boundary) so that prompt + target fit max_length
    validation      loss on every validation example (teacher forcing), then generation
                    (beam search, lmforge.generate) on the first max_eval_samples examples;
                    summarize: ROUGE-1/2/L/Lsum (rouge-score), translate: BLEU and chrF
                    (sacrebleu), both x100; gen_len: mean generated tokens; a few samples
                    go to report.md
    export          BART-shaped models as BartForConditionalGeneration, T5 (mT5 too) as
                    T5ForConditionalGeneration, GPT-2 / Llama as
                    GPT2LMHeadModel / LlamaForCausalLM; others (the original Transformer)
                    in lmforge's format (the driver decides)

Task options (FinetuneConfig.options, see Seq2SeqOptions) carry what FinetuneConfig has no
field for: fields / languages, target length and the generation settings.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.data.batching import IGNORE_INDEX, collate_lm
from lmforge.data.datasets_io import is_dataset_source
from lmforge.data.readers import Seq2SeqData, read_parallel, read_seq2seq
from lmforge.eval.metrics import bleu_scores, rouge_scores
from lmforge.generate.decode import GenerationConfig, generate
from lmforge.models import ENCODER_DECODERS
from lmforge.tasks.base import Base, FinetuneConfig, Outputs, Setup, log_truncation, task_options, truncating
from lmforge.train.logging import progress_bar
from lmforge.train.objectives import ObjectiveOutput, clm, denoise

log = logging.getLogger("lmforge.tasks")

DATA_SUFFIXES = (".jsonl", ".ndjson", ".tsv", ".tab", ".csv")
SAMPLE_CHARS = 300  # longer texts are shortened in report.md's sample table



@dataclass
class Seq2SeqOptions:
    """Options of summarize / translate (FinetuneConfig.options).

    Args:
        source_field: source column or JSON field (name, or 0-based index of a header-less TSV/CSV).
        target_field: target column or JSON field.
        source_lang: with target_lang: read line-aligned files PATH.SRC and PATH.TGT.
        target_lang: the target files' suffix.
        max_target_length: target tokens at most, EOS included (longer targets are cut).
        max_new_tokens: tokens to generate at most; None: max_target_length.
        num_beams: beam search width at validation (1: greedy).
        length_penalty: beam scores are sum log p / length ** length_penalty.
        no_repeat_ngram_size: no n-gram of this size is generated twice (0: off).
        max_eval_samples: generate for the first N validation examples only (None: all);
            the validation loss always covers all of them.
        prompt: decoder-only prompt template containing {source}; None: the task's.
        source_prefix: an encoder-decoder's text before every source (T5's task prefixes:
            "summarize: ", "translate German to English: "); "": none.
        n_samples: sample outputs shown in report.md.
    """

    source_field: str | int = "source"
    target_field: str | int = "target"
    source_lang: str | None = None
    target_lang: str | None = None
    max_target_length: int = 128
    max_new_tokens: int | None = None
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    max_eval_samples: int | None = None
    prompt: str | None = None
    source_prefix: str = ""
    n_samples: int = 5

    def __post_init__(self) -> None:
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if not isinstance(self.max_target_length, int) or self.max_target_length < 2:
            raise ValueError(f"max_target_length must be an integer >= 2 (a token and EOS), got "
                             f"{self.max_target_length!r}")
        for name in ("max_new_tokens", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.no_repeat_ngram_size < 0 or self.n_samples < 0:
            raise ValueError("no_repeat_ngram_size and n_samples must be >= 0")
        if (self.source_lang is None) != (self.target_lang is None):
            raise ValueError("source_lang and target_lang go together (parallel files PATH.SRC and PATH.TGT)")
        if self.prompt is not None and "{source}" not in self.prompt:
            raise ValueError(f"prompt must contain {{source}}, got {self.prompt!r}")


# ----------------------------------------------------------------------------- data


def read_pairs(path: Path, opts: Seq2SeqOptions, skip_bad: bool, columns: str | None = None) -> Seq2SeqData:
    """Source/target pairs of a data file or dataset source (lmforge.data.datasets_io), or of
    parallel files PATH.SRC / PATH.TGT (PATH may also name the source file itself: train.de
    with source_lang de)."""
    if opts.source_lang is not None:
        prefix = str(path).removesuffix(f".{opts.source_lang}")
        return read_parallel(f"{prefix}.{opts.source_lang}", f"{prefix}.{opts.target_lang}", skip_bad=skip_bad)
    if path.suffix.lower() not in DATA_SUFFIXES and not is_dataset_source(path):
        raise ValueError(f"{path}: expected a .jsonl, .tsv, .csv or .parquet file (or a datasets directory or Hub "
                         "id:split) with source and target fields, or "
                         "parallel files PATH.SRC / PATH.TGT with source_lang and target_lang")
    return read_seq2seq(path, source_field=opts.source_field, target_field=opts.target_field, skip_bad=skip_bad,
                        columns=columns)


def _target_ids(base: Base, targets: list[str], budget: int, special: bool, prefix: str) -> tuple[list[list[int]], int]:
    """Targets -> ids ending in exactly one EOS, at most `budget` tokens; (ids, number cut).
    special: add the tokenizer's special tokens (an encoder-decoder's labels, BART's <s> ... </s>)."""
    eos = base.tokenizer.eos_id
    ends_in_eos = special and base.tokenizer.encode("a", add_special_tokens=True)[-1:] == [eos]
    backend = truncating(base.tokenizer, budget if ends_in_eos else budget - 1)
    encodings = backend.encode_batch([prefix + t for t in targets], add_special_tokens=special)
    rows = [e.ids if ends_in_eos else e.ids + [eos] for e in encodings]
    return rows, sum(1 for e in encodings if e.overflowing)


def _prompt_ids(base: Base, template: str, source: str, budget: int) -> tuple[list[int], bool]:
    """The template around `source` as ids, at most `budget` of them: the source is cut at a
    token boundary (by its characters) until the whole prompt fits. Returns (ids, cut)."""
    tok = base.tokenizer
    ids = tok.encode(template.replace("{source}", source))
    if len(ids) <= budget:
        return ids, False
    overhead = len(tok.encode(template.replace("{source}", "")))
    offsets = tok.encodings([source], add_special_tokens=False)[0].offsets
    keep = min(budget - overhead, len(offsets))
    while keep >= 1:
        ids = tok.encode(template.replace("{source}", source[:offsets[keep - 1][1]]))
        if len(ids) <= budget:
            return ids, True
        keep -= 1
    raise ValueError(f"max_length leaves {budget} tokens for the prompt, too few for the template "
                     f"({overhead} tokens) and any source; raise max_length or lower max_target_length")


def encdec_features(base: Base, data: Seq2SeqData, max_length: int, max_target: int, what: str,
                    notes: list[str], source_prefix: str = "") -> list[dict[str, Any]]:
    """Features {input_ids: source_prefix + source (special tokens included), labels: target + EOS}."""
    sources = truncating(base.tokenizer, max_length).encode_batch([source_prefix + s for s in data.sources])
    log_truncation(f"{what} sources", sum(1 for e in sources if e.overflowing), len(data), max_length, notes)
    targets, cut = _target_ids(base, data.targets, max_target, special=True, prefix="")
    log_truncation(f"{what} targets", cut, len(data), max_target, notes)
    return [{"input_ids": s.ids or [base.tokenizer.eos_id], "labels": t} for s, t in zip(sources, targets)]


def decoder_features(base: Base, data: Seq2SeqData, template: str, max_length: int, max_target: int, what: str,
                     notes: list[str]) -> list[dict[str, Any]]:
    """Features {input_ids: prompt + target + EOS, labels: the next token where it is a target
    token (causal LM labels, already shifted), else -100; prompt_len}."""
    max_target = min(max_target, max_length - 1)
    targets, cut = _target_ids(base, data.targets, max_target, special=False, prefix=" ")
    log_truncation(f"{what} targets", cut, len(data), max_target, notes)
    features, cut_sources = [], 0
    for source, target in zip(data.sources, targets):
        prompt, was_cut = _prompt_ids(base, template, source, max_length - len(target))
        cut_sources += was_cut
        ids = prompt + target
        labels = [IGNORE_INDEX] * (len(prompt) - 1) + target + [IGNORE_INDEX]  # labels[t] = ids[t + 1]
        features.append({"input_ids": ids, "labels": labels, "prompt_len": len(prompt)})
    log_truncation(f"{what} sources", cut_sources, len(data), max_length, notes)
    return features


def step(model: nn.Module, batch: dict[str, Tensor], encdec: bool) -> tuple[ObjectiveOutput, None]:
    """Summed target-token cross-entropy (teacher forcing); no per-item outputs: the metrics
    come from generation in `score`."""
    return (denoise if encdec else clm)(model, batch), None


# ----------------------------------------------------------------------------- generation


def prompts_of(features: list[dict[str, Any]], encdec: bool) -> list[list[int]]:
    """What generation starts from: the encoder input, or the decoder-only prompt."""
    return [f["input_ids"] if encdec else f["input_ids"][:f["prompt_len"]] for f in features]


def generate_ids(model: nn.Module, prompts: list[list[int]], config: GenerationConfig, batch_size: int,
                 encdec: bool, progress: bool = False) -> list[list[int]]:
    """Generated ids per prompt (EOS and what follows it removed), in the prompts' order.

    Prompts are batched by length (little padding): right-padded sources for an encoder-decoder,
    left-padded prompts for a decoder-only model, whose max_new_tokens shrinks where prompt +
    new tokens would pass max_seq_len."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in progress_bar(range(0, len(order), batch_size), progress, "generation"):
        chunk = order[start:start + batch_size]
        rows = [prompts[i] for i in chunk]
        P = max(len(r) for r in rows)
        ids = torch.full((len(rows), P), config.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), P, dtype=torch.long)
        for j, r in enumerate(rows):
            cols = slice(0, len(r)) if encdec else slice(P - len(r), P)
            ids[j, cols], mask[j, cols] = torch.tensor(r), 1
        limit = model.config.max_seq_len - (0 if encdec else P - 1)
        cfg = dataclasses.replace(config, max_new_tokens=min(config.max_new_tokens, limit))
        tokens = generate(model, ids.to(device), mask.to(device), cfg).tokens.tolist()
        for i, row in zip(chunk, tokens):
            out[i] = row[:row.index(config.eos_token_id)] if config.eos_token_id in row else row
    return out


def _short(text: str) -> str:
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS - 3] + "..."


def score(model: nn.Module, outputs: Outputs, *, base: Base, features: list[dict[str, Any]], data: Seq2SeqData,
          config: GenerationConfig, opts: Seq2SeqOptions, batch_size: int, encdec: bool, metric_fn,
          progress: bool = False) -> dict[str, Any]:
    """Generate for the first max_eval_samples validation examples and score the text."""
    n = min(len(features), opts.max_eval_samples or len(features))
    ids = generate_ids(model, prompts_of(features[:n], encdec), config, batch_size, encdec, progress)
    predictions = [base.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    metrics: dict[str, Any] = dict(metric_fn(predictions, data.targets[:n]))
    metrics["gen_len"] = sum(map(len, ids)) / n
    metrics["eval_samples"] = n
    metrics["samples"] = [{"source": _short(data.sources[i]), "reference": _short(data.targets[i]),
                           "prediction": _short(predictions[i])} for i in range(min(n, opts.n_samples))]
    metrics["predictions"] = [{"source": s, "reference": r, "prediction": p}
                              for s, r, p in zip(data.sources, data.targets, predictions)]
    return metrics


def report(metrics: dict[str, Any], out: Path) -> dict[str, object]:
    return {"sample outputs": metrics["samples"]} if metrics.get("samples") else {}


# ----------------------------------------------------------------------------- the tasks


def model_kind(base: Base, task: str) -> bool:
    """True for an encoder-decoder, False for a decoder-only model; ValueError for anything else."""
    if base.head is not None:
        raise ValueError(f"{base.path}: the model has a {base.head.kind} head; {task} needs a language model "
                         "(an encoder-decoder such as BART, or a decoder-only GPT / Llama) without a task head")
    if base.family == "bert":
        raise ValueError(f"{base.path}: {task} generates text, which needs an encoder-decoder (BART, Transformer) "
                         "or a decoder-only model (GPT, Llama); this is a BERT encoder, which has no decoder")
    if base.tokenizer.eos_id is None:
        raise ValueError(f"{base.path}: the tokenizer has no EOS token, so the model could not learn to stop; "
                         "use a tokenizer with an eos_token")
    encdec = base.family in ENCODER_DECODERS
    if encdec and not 0 <= base.config.decoder_start_token_id < base.config.vocab_size:
        raise ValueError(f"{base.path}: decoder_start_token_id {base.config.decoder_start_token_id} is not a token "
                         f"id of the model (vocab_size {base.config.vocab_size})")
    return encdec


class Seq2SeqTask:
    """A sequence-to-sequence task; `summarize` and `translate` differ in metric, default
    lengths and generation settings, and prompt (see the module docstring)."""

    name = "seq2seq"
    options_type = Seq2SeqOptions
    evaluate_only = False
    metric = "rougeL"
    metrics: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    max_length = 512
    option_defaults: dict[str, Any] = {}
    prompt = "{source}\n\nTL;DR:"

    @staticmethod
    def metric_fn(predictions: list[str], references: list[str]) -> dict[str, float]:
        return rouge_scores(predictions, references)

    def setup(self, base: Base, config: FinetuneConfig, train: Path | None, valid: Path) -> Setup:
        encdec = model_kind(base, self.name)
        opts = task_options(self, config)
        max_target = min(opts.max_target_length, base.config.max_seq_len)
        template = opts.prompt or self.prompt
        notes: list[str] = []

        def features(path: Path) -> tuple[Seq2SeqData, list[dict[str, Any]]]:
            data = read_pairs(path, opts, config.skip_bad, config.columns)
            if data.skipped:
                notes.append(f"{path}: skipped {data.skipped} malformed records")
            if encdec:
                return data, encdec_features(base, data, config.max_length, max_target, str(path), notes,
                                             opts.source_prefix)
            return data, decoder_features(base, data, template, config.max_length, max_target, str(path), notes)

        train_features = features(train)[1] if train is not None else []
        valid_data, valid_features = features(valid)
        gen = GenerationConfig(max_new_tokens=opts.max_new_tokens or max_target, num_beams=opts.num_beams,
                               length_penalty=opts.length_penalty, no_repeat_ngram_size=opts.no_repeat_ngram_size,
                               eos_token_id=base.tokenizer.eos_id, pad_token_id=base.pad_id)
        n_eval = min(len(valid_data), opts.max_eval_samples or len(valid_data))
        notes.append(f"{'/'.join(self.metrics)} on generations for {n_eval} of {len(valid_data)} validation "
                     f"examples (num_beams {gen.num_beams}, max_new_tokens {gen.max_new_tokens}, length_penalty "
                     f"{gen.length_penalty}, no_repeat_ngram_size {gen.no_repeat_ngram_size}); loss on all")
        if not encdec:
            notes.append(f"decoder-only format: {template!r} then ' ' + target + EOS; loss on the target tokens")
        return Setup(
            model=base.model, head=None, train=train_features, valid=valid_features,
            collate=functools.partial(collate_lm, pad_id=base.pad_id),
            step=functools.partial(step, encdec=encdec),
            score=functools.partial(score, base=base, features=valid_features, data=valid_data, config=gen,
                                    opts=opts, batch_size=config.batch_size, encdec=encdec,
                                    metric_fn=self.metric_fn, progress=config.progress),
            report=report, notes=notes)


class Summarize(Seq2SeqTask):
    """summarize: ROUGE on generated summaries (DialogSum: source_field=dialogue, target_field=summary)."""

    name = "summarize"
    metric = "rougeL"
    metrics = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    max_length = 512
    # no_repeat_ngram_size stays 0: a 3-gram ban (BART's CNN/DM setting) breaks summaries that
    # repeat a name written as several tokens, such as DialogSum's "#Person2#".
    option_defaults = {"max_target_length": 128}
    prompt = "{source}\n\nTL;DR:"


class Translate(Seq2SeqTask):
    """translate: BLEU and chrF on generated translations (Multi30k: source_lang=de, target_lang=en)."""

    name = "translate"
    metric = "bleu"
    metrics = ("bleu", "chrf")
    max_length = 128
    option_defaults = {"max_target_length": 128}
    prompt = "Translate: {source}\n=>"

    @staticmethod
    def metric_fn(predictions: list[str], references: list[str]) -> dict[str, float]:
        return bleu_scores(predictions, references)
