"""The `lmforge` command: a table of subcommands, each parsed by jsonargparse and
handed to a library function. Parsing only; the work happens in the library.

A mistake in what the user passed (a missing file, a bad field, a malformed record)
prints one line naming it and exits with status 2; set LMFORGE_DEBUG=1 for the
traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import sys
import typing
from collections.abc import Callable

import docstring_parser
import yaml
from jsonargparse import ActionYesNo, ArgumentParser, Namespace

import lmforge

log = logging.getLogger("lmforge")


class UserError(Exception):
    """A mistake in what the user passed: printed as one line, exit status 2."""


class Parser(ArgumentParser):
    """jsonargparse's parser, whose usage errors are one line plus a hint (not the whole usage)."""

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        text = " ".join(message.split()).replace("<class '", "").replace("'>", "")
        text = re.sub(r'Parser key "([^"]+)": Expected an? (.+?)\. Got value: ', r"\1: expected \2, got ", text)
        raise UserError(f"{text} (see `{prog} --help`)")


# ----------------------------------------------------------------------------- commands


def _quickstart_args(p: ArgumentParser) -> None:
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--corpus", default=None, help="a text file (default: the packaged Tiny Shakespeare)")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-time budget for the whole job")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="pretraining options on top of the recipe, dotted as `lmforge pretrain` takes them "
                        "(optim.optimizer=muon optim.schedule=wsd model.overrides.act=relu2)")


def _quickstart(a: Namespace) -> None:
    from lmforge.quickstart import quickstart

    overrides = {}
    for item in a.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.optimizer=muon")
        overrides[key] = yaml.safe_load(value)
    quickstart(a.out, a.corpus, a.minutes, a.device, a.seed, overrides)


def _convert_args(p: ArgumentParser) -> None:
    p.add_argument("src", help="model directory (lmforge or Hugging Face)")
    p.add_argument("dst", help="output directory (hf, lmforge) or .gguf file (gguf)")
    p.add_argument("--to", choices=["hf", "lmforge", "gguf"], required=True,
                   help="output format; gguf: one file for llama.cpp / Ollama (decoder-only models)")
    p.add_argument("--dtype", choices=[None, "f32", "f16", "q8_0"], default=None, help="gguf: tensor type (f16)")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory merged into the model first")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory that is not a model directory (same-named files are "
                        "replaced, nothing is deleted)")


def _convert(a: Namespace) -> None:
    from lmforge.api import convert

    out = convert(a.src, a.dst, a.to, overwrite=a.overwrite, dtype=a.dtype, adapter=a.adapter)
    print(f"wrote {out} ({a.to} format{f', {a.dtype}' if a.dtype else ''})")


DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]  # default (none given): float32
QUANTIZE_CHOICES = ["none", "int8", "int4"]


def _model_args(p: ArgumentParser, adapter: bool = True) -> None:
    p.add_argument("--model", required=True, help="model directory (lmforge or Hugging Face) or Hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="weights dtype (auto: the checkpoint's)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES, help="weight-only int8 / int4 for decoding")
    if adapter:
        p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory for this model (merged on load)")


def _load(a: Namespace):
    import torch

    from lmforge.api import load

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load(a.model, device=device, dtype=a.dtype, adapter=a.adapter, quantize=a.quantize)


def _pretrain_args(p: ArgumentParser) -> None:
    from lmforge.config import RunConfig

    p.add_class_arguments(RunConfig, fail_untyped=True, sub_configs=True)


def _pretrain(a: Namespace) -> None:
    from lmforge.config import from_namespace
    from lmforge.dist import parallel
    from lmforge.pretrain import pretrain

    result = pretrain(from_namespace(a))
    if parallel.main_process():  # under torchrun: one summary, not one per process
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, default=str))
    if result.get("stopped") == "interrupted":
        sys.exit(130)


def _generate_args(p: ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--prompt", nargs="+", default=[], help="prompt(s); several give a batch")
    p.add_argument("--chat", action="store_true", help="interactive chat with the model's chat template")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None,
                   help="0: greedy (default: greedy, or the model's generation_config.json sampling settings)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--stop", nargs="+", default=[], help="stop strings")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prompt-lookup", type=int, default=0,
                   help="greedy, one prompt: check up to N tokens that follow an earlier match of the latest "
                        "n-gram in one forward pass (same output, faster on text that repeats its prompt; 0: off)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="run long prompts through the model N tokens "
                   "at a time (less memory; same output)")


def _generate(a: Namespace) -> None:
    lm = _load(a)
    given = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty)
    options = dict({k: v for k, v in given.items() if v is not None}, no_repeat_ngram_size=a.no_repeat_ngram_size,
                   stop=a.stop or None, seed=a.seed, prompt_lookup=a.prompt_lookup, prefill_chunk=a.prefill_chunk)
    if a.chat:
        return _chat_loop(lm, a.max_new_tokens, options)
    if not a.prompt:
        raise UserError("give --prompt TEXT (or --chat)")
    if a.stream:
        for piece in lm.stream(a.prompt[0], a.max_new_tokens, **options):
            print(piece, end="", flush=True)
        print()
        return
    outputs = lm.generate(a.prompt, a.max_new_tokens, num_beams=a.num_beams, length_penalty=a.length_penalty,
                          num_return_sequences=a.num_return_sequences, **options)
    for prompt, out in zip(a.prompt, outputs):
        for text in out if isinstance(out, list) else [out]:
            print(f"{prompt}{text}" if lm.family == "gpt" else text)
            print("-" * 40)


def _chat_loop(lm, max_new_tokens: int, options: dict) -> None:
    if lm.tokenizer is None or lm.tokenizer.chat_template is None:
        raise UserError("--chat needs a model whose tokenizer has a chat template (fine-tune one with `sft`)")
    messages: list[dict[str, str]] = []
    print("chat: type a message, an empty line or Ctrl-D to quit")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        reply = lm.chat(messages, max_new_tokens, **options)
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")


def _inspect_attention_args(p: ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--text", required=True, help="the input text")
    p.add_argument("--target", default=None, help="decoder text for encoder-decoder models")
    p.add_argument("--out", default="inspect", help="output directory for the PNG and HTML pages")


def _inspect_attention(a: Namespace) -> None:
    from lmforge.inspection import inspect_attention

    lm = _load(a)
    for path in inspect_attention(lm.model, lm._needs_tokenizer("inspect"), a.text, a.out, target=a.target):
        print(f"wrote {path}")


def _inspect_next_token_args(p: ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--text", required=True, help="the input text (use the [MASK] token for BERT models)")
    p.add_argument("--k", type=int, default=5, help="how many alternatives per position")
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def _inspect_next_token(a: Namespace) -> None:
    from lmforge.inspection import inspect_next_token

    lm = _load(a)
    rows, text = inspect_next_token(lm.model, lm._needs_tokenizer("inspect"), a.text, a.k)
    print(json.dumps(rows, indent=1, ensure_ascii=False) if a.json else text)


def _inspect_positions_args(p: ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--out", default="inspect", help="output directory for the pictures")
    p.add_argument("--max-positions", type=int, default=None)


def _inspect_positions(a: Namespace) -> None:
    from lmforge.inspection import inspect_positions

    lm = _load(a)
    for path in inspect_positions(lm.model, a.out, max_positions=a.max_positions):
        print(f"wrote {path}")


def _serve_args(p: ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=None,
                   help="model directory (lmforge or Hugging Face); repeat it to serve several")
    p.add_argument("--served-model-name", action="append", default=None,
                   help="the name clients use for a model, one per --model (default: the directory's name)")
    p.add_argument("--adapter", action="append", default=None,
                   help="a PEFT LoRA adapter directory merged into the model on load, one per --model in order "
                        "('none' for a model without one); the model is served under the adapter's name")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="weights dtype (auto: the checkpoint's)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES, help="weight-only int8 / int4 for decoding")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="0..65535 (0: any free port)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or set LMFORGE_API_KEY)")
    p.add_argument("--max-tokens", type=int, default=512, help="most new tokens per request")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt, in tokens")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive (then 408 and the connection is closed)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences (prompts x n) accepted at once per model, running or waiting, before 503")
    p.add_argument("--max-active", type=int, default=64,
                   help="sequences running at once per model (requests take decoding steps in turn)")
    p.add_argument("--backend", action="append", default=None,
                   help="NAME=URL: a model of another OpenAI-compatible server (URL like http://host:8001/v1), for "
                        "the arena; repeatable")
    p.add_argument("--backend-key", action="append", default=None, help="NAME=KEY: the API key of --backend NAME")
    p.add_argument("--arena-db", default=None,
                   help="SQLite file of the arena's ratings (default with two models or more: arena.db)")
    p.add_argument("--study", default=None, help="JSONL file of prompts every rater judges (one {\"prompt\": ...} "
                                                  "per line)")


def _serve(a: Namespace) -> None:
    from lmforge.serve import serve

    serve(a.model, host=a.host, port=a.port, api_key=a.api_key, served_model_names=a.served_model_name,
          max_tokens=a.max_tokens, max_prompt_tokens=a.max_prompt_tokens, max_body_bytes=a.max_body_bytes,
          max_queue=a.max_queue, max_active=a.max_active, body_timeout_s=a.body_timeout, device=a.device,
          dtype=a.dtype, quantize=a.quantize, backends=a.backend or (), backend_keys=a.backend_key or (),
          arena_db=a.arena_db, study=a.study, adapters=a.adapter or ())


def _arena_report_args(p: ArgumentParser) -> None:
    p.add_argument("db", help="the arena's SQLite file (lmforge serve --arena-db)")
    p.add_argument("--out", default=None, help="output directory (default: beside DB, named DB-report)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")


def _arena_report(a: Namespace) -> None:
    from pathlib import Path

    from lmforge.eval.arena_report import write_report

    db = Path(a.db)
    out = Path(a.out) if a.out else db.with_name(f"{db.stem}-report")
    paths = write_report(db, out, a.bootstrap, a.seed)
    print(paths[1].read_text(encoding="utf-8"))
    for path in paths:
        print(f"wrote {path}")


def _plan_args(p: ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a preset name, a model directory or a config.json")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's max)")
    p.add_argument("--target-len", type=int, default=None, help="decoder tokens (encoder-decoder models)")
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0: full fine-tuning)")
    p.add_argument("--lora-targets", nargs="+", default=["wqkv", "wo"], help="projections with adapters")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--device", default="h100", help="h100, a100, cpu (measured here) or measured")
    p.add_argument("--mfu", type=float, default=None, help="assumed model-FLOPs utilisation")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--verify", action="store_true", help="run real steps and print predicted beside measured")
    p.add_argument("--verify-steps", type=int, default=3)
    p.add_argument("--clock", choices=["wall", "process"], default="wall", help="how --verify times steps")


def _plan(a: Namespace) -> None:
    from lmforge.plan import format_plan, format_verify, make_plan, plan_json, verify_json, verify_plan

    plan = make_plan(a.model, seq_len=a.seq_len, target_len=a.target_len, batch_size=a.batch_size,
                     grad_accum=a.grad_accum, precision=a.precision, optimizer=a.optimizer,
                     activation_checkpointing=a.activation_checkpointing, lora_rank=a.lora_rank,
                     lora_targets=tuple(a.lora_targets), devices=a.devices, strategy=a.strategy, device=a.device,
                     mfu=a.mfu)
    print(plan_json(plan) if a.json else format_plan(plan))
    if a.verify:
        result = verify_plan(plan, a.verify_steps, clock=a.clock)
        print(verify_json(result) if a.json else format_verify(result))


def _tokenizer_train_args(p: ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, help="corpus files, directories or globs")
    p.add_argument("--kind", choices=["bpe", "wordpiece", "unigram"], default="bpe",
                   help="byte-level BPE (GPT-2), WordPiece (BERT) or Unigram")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--out", required=True, help="output directory (tokenizer.json and transformers' config files)")
    p.add_argument("--lowercase", action="store_true")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--special-tokens", nargs="+", default=None,
                   help="special tokens, or role=token pairs (e.g. pad=<pad>); default: the kind's usual set")
    p.add_argument("--field", default="text", help="the text field of .jsonl / column of .csv, .tsv, .parquet")


def _tokenizer_train(a: Namespace) -> None:
    from lmforge.data.tokenizer_training import train_tokenizer_command

    report = train_tokenizer_command(a.input, a.kind, a.vocab_size, a.out, a.lowercase, a.min_frequency,
                                     a.special_tokens, a.field)
    print(json.dumps(report, indent=1))


def _data_prepare_args(p: ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--input", nargs="+", required=True, help="corpus files, directories or globs")
    p.add_argument("--out", required=True, help="output directory of token shards")
    p.add_argument("--val-fraction", type=float, default=0.0005, help="fraction of documents for validation")
    p.add_argument("--field", default="text", help="the text field of .jsonl / column of .csv, .tsv, .parquet")
    p.add_argument("--doc-per-file", action="store_true", help="each .txt file is one document")
    p.add_argument("--replace-bad-bytes", action="store_true",
                   help="replace non-UTF-8 bytes with U+FFFD instead of refusing the file")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if an identical preparation exists")


def _data_prepare(a: Namespace) -> None:
    from lmforge.data.prepare import prepare_corpus

    stats = prepare_corpus(a.tokenizer, a.input, a.out, val_fraction=a.val_fraction, field=a.field,
                           doc_per_file=a.doc_per_file, errors="replace" if a.replace_bad_bytes else "strict",
                           seed=a.seed, num_workers=a.workers, overwrite=a.overwrite, progress=True)
    if stats["skipped"]:
        print(f"{a.out}: already prepared from the same inputs and tokenizer (use --overwrite to rebuild)")
    else:
        print(f"{a.out}: {stats['n_tokens']:,} tokens from {stats['n_docs']:,} documents ({stats['mb']:.1f} MB) in "
              f"{stats['seconds']:.1f}s: {stats['mb_per_s']:.1f} MB/s, {stats['tokens_per_s']:,.0f} tokens/s, "
              f"{stats['workers']} worker(s)")
    print(json.dumps(stats["splits"]))


def _dataclass_flags(p: ArgumentParser, cls: type, *, optional: bool = False, skip: set[str] = frozenset(),
                     only: set[str] | None = None) -> list[str]:
    """One kebab-case flag per field of a config dataclass (`text_column` -> `--text-column`),
    typed by its annotation, helped by its docstring's Args line (a base class's for inherited
    fields). optional=True makes every default None ("not given": the library's own default
    applies). Returns the field names."""
    hints = typing.get_type_hints(cls)
    docs = {d.arg_name: d.description for klass in reversed(cls.__mro__)
            for d in docstring_parser.parse(klass.__doc__ or "").params}
    names = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.name in skip or (only is not None and f.name not in only) or typing.get_origin(hint) is dict \
                or f.name == "options":
            continue
        default = None if optional else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag, help_text = f"--{f.name.replace('_', '-')}", docs.get(f.name)
        if hint is bool:
            p.add_argument(flag, action=ActionYesNo(no_prefix="no-"), default=default, help=help_text)
        elif typing.get_origin(hint) is list:
            p.add_argument(flag, nargs="+", type=typing.get_args(hint)[0], default=default, help=help_text)
        else:
            p.add_argument(flag, type=hint | None if optional else hint, default=default, help=help_text)
        names.append(f.name)
    return names


def _task_args(task, evaluate: bool) -> Callable[[ArgumentParser], None]:
    def add(p: ArgumentParser) -> None:
        from lmforge.tasks import FinetuneConfig

        p.add_argument("--model", required=True, help="starting model directory (lmforge or Hugging Face)")
        if evaluate:
            p.add_argument("--data", required=True, help="the data to evaluate on")
            p.add_argument("--out", default=None, help="write metrics.json, predictions.jsonl and report.md here")
        else:
            p.add_argument("--train", required=True, help="training data")
            p.add_argument("--valid", required=True, help="validation data")
            p.add_argument("--out", required=True, help="run directory: metrics.json, report.md, model/, ...")
        config_fields = _dataclass_flags(p, FinetuneConfig, skip=set() if evaluate else {"quantize"},
                                         only=set(FinetuneConfig.EVALUATE_FIELDS) if evaluate else None)
        if task.options_type is not None:
            _dataclass_flags(p, task.options_type, optional=True, skip=set(config_fields))
    return add


def _task_run(name: str, evaluate: bool) -> Callable[[Namespace], None]:
    def run(a: Namespace) -> None:
        from lmforge.dist import parallel
        from lmforge.tasks import FinetuneConfig, finetune, get_task
        from lmforge.tasks import evaluate as evaluate_task

        task = get_task(name)
        config_names = set(FinetuneConfig.EVALUATE_FIELDS) if evaluate else \
            {f.name for f in dataclasses.fields(FinetuneConfig)} - {"options", "quantize"}
        option_names = {f.name for f in dataclasses.fields(task.options_type)} if task.options_type else set()
        options = {k: a[k] for k in option_names - config_names if a[k] is not None}
        config = FinetuneConfig(**{k: a[k] for k in config_names}, options=options)
        if evaluate:
            metrics = evaluate_task(name, a.model, a.data, a.out, config=config)
        else:
            metrics = finetune(name, a.model, a.train, a.valid, a.out, config=config)
        if parallel.main_process():
            print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=1))
    return run


def _task_commands(evaluate: bool) -> dict[str, Command]:
    from lmforge.tasks import TASKS

    verb = "evaluate a model on" if evaluate else "fine-tune a model for"
    return {name: (f"{verb} {name}", _task_args(task, evaluate), _task_run(name, evaluate))
            for name, task in TASKS.items() if evaluate or not task.evaluate_only}


def _benchmark_args(p: ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--data", required=True, help="the benchmark's own file, e.g. hellaswag_val.jsonl, wiki.test.raw")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples (wikitext: documents)")
    p.add_argument("--num-fewshot", type=int, default=0, help="solved examples before each prompt")
    p.add_argument("--fewshot-data", default=None, help="the file few-shot examples come from (default: --data)")
    p.add_argument("--fewshot-seed", type=int, default=1234, help="seed of the few-shot draws")
    p.add_argument("--batch-size", type=int, default=16, help="packed rows per forward pass")
    p.add_argument("--max-length", type=int, default=None, help="window in tokens (default: the model's)")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="resamples of bootstrapped stderrs (0: none)")
    p.add_argument("--out", default=None, help="write results.json and samples_TASK.jsonl here")


def _benchmark_run(name: str) -> Callable[[Namespace], None]:
    def run(a: Namespace) -> None:
        from lmforge.eval.benchmarks import evaluate_benchmark, summary_line

        lm = _load(a)
        if lm.head is not None or lm.family != "gpt":
            raise UserError(f"{a.model}: {name} needs a causal language model (GPT / Llama family, no task head)")
        result = evaluate_benchmark(lm.model, lm.tokenizer, name, a.data, limit=a.limit, num_fewshot=a.num_fewshot,
                                    fewshot_data=a.fewshot_data, fewshot_seed=a.fewshot_seed, batch_size=a.batch_size,
                                    max_length=a.max_length, bootstrap_iters=a.bootstrap_iters, out=a.out,
                                    progress=True)
        print(summary_line(result))
    return run


def _benchmark_commands() -> dict[str, Command]:
    """`evaluate hellaswag`, `evaluate wikitext`, ...: the language-model benchmarks."""
    from lmforge.eval.benchmarks import BENCHMARKS

    return {name: (b.help, _benchmark_args, _benchmark_run(name)) for name, b in BENCHMARKS.items()}


# name -> (help, add arguments, run); a dict of such entries makes a command group.
Command = tuple[str, Callable[[ArgumentParser], None], Callable[[Namespace], None]]
COMMANDS: dict[str, Command | dict[str, Command]] = {
    "quickstart": ("the main job: tokenizer, GPT pretraining, evaluation and samples on Tiny Shakespeare in "
                   "minutes", _quickstart_args, _quickstart),
    "pretrain": ("pretrain a model (clm, mlm, mlm+nsp, denoise) from a YAML config and dotted overrides",
                 _pretrain_args, _pretrain),
    "finetune": _task_commands(evaluate=False),
    "evaluate": {**_task_commands(evaluate=True), **_benchmark_commands()},
    "generate": ("generate text from a model (greedy, sampling, beam search) or chat with it",
                 _generate_args, _generate),
    "tokenizer": {
        "train": ("train a tokenizer (bpe, wordpiece, unigram) on your text", _tokenizer_train_args,
                  _tokenizer_train),
    },
    "data": {
        "prepare": ("tokenize a corpus into train/validation token shards, on all cores", _data_prepare_args,
                    _data_prepare),
    },
    "plan": ("predict parameters, FLOPs, memory and time of a training setup (--verify measures them)",
             _plan_args, _plan),
    "serve": ("serve models over HTTP: OpenAI-compatible API, a web playground and, with two models or more, "
              "an arena for human ratings", _serve_args, _serve),
    "arena": {
        "report": ("win rates, Bradley-Terry scores and rater agreement of arena votes, with a plot and exports",
                   _arena_report_args, _arena_report),
    },
    "inspect": {
        "attention": ("attention weights of every layer and head as PNG and HTML", _inspect_attention_args,
                      _inspect_attention),
        "next-token": ("top-k next tokens and entropy per position (fill-mask for BERT)",
                       _inspect_next_token_args, _inspect_next_token),
        "positions": ("pictures of the model's position encodings", _inspect_positions_args, _inspect_positions),
    },
    "convert": ("convert a model directory between lmforge and Hugging Face formats, or to GGUF for llama.cpp",
                _convert_args, _convert),
}


# ----------------------------------------------------------------------------- plumbing


def build_parser() -> ArgumentParser:
    parser = Parser(prog="lmforge", description=lmforge.__doc__, env_prefix="LMFORGE", default_env=False)
    parser.add_argument("--version", action="version", version=f"lmforge {lmforge.__version__}")
    _add_commands(parser, COMMANDS)
    return parser


def _add_commands(parser: ArgumentParser, table: dict) -> None:
    sub = parser.add_subcommands(dest="command", required=True)
    for name, entry in table.items():
        p = Parser(prog=f"{parser.prog} {name}")
        if isinstance(entry, dict):
            sub.add_subcommand(name, p, help=f"{name} commands: {', '.join(entry)}")
            _add_commands(p, entry)
        else:
            p.add_argument("--config", action="config",
                           help="YAML file of this command's options, as --print_config writes them (pretrain: "
                                "the sections below; finetune: the run's finetune.yaml); later flags override it")
            entry[1](p)
            sub.add_subcommand(name, p, help=entry[0])


def _spellings(parser: ArgumentParser, argv: list[str]) -> list[str]:
    """Both spellings of every flag, `--train.max-steps` and `--train.max_steps`, `--batch_size`
    and `--batch-size`: a flag the command's parser does not know is rewritten to the other
    spelling where that one is known (unknown flags stay as they are, for the parser's error)."""
    out = []
    for arg in argv:
        sub = parser._subcommands_action
        if sub is not None and arg in sub._name_parser_map:
            parser = sub._name_parser_map[arg]
        elif arg.startswith("--"):
            name, eq, value = arg.partition("=")
            known = {o for action in parser._actions for o in action.option_strings}
            other = [s for s in (name.replace("_", "-"), "--" + name[2:].replace("-", "_")) if s in known]
            arg = (name if name in known or not other else other[0]) + eq + value
        out.append(arg)
    return out


def _resolve(table: dict, args: Namespace) -> tuple[Callable[[Namespace], None], Namespace]:
    name = args["command"]
    entry, args = table[name], args[name]
    if isinstance(entry, dict):
        return _resolve(entry, args)
    return entry[2], args


def _config_files(argv: list[str]) -> list[str]:
    """Check every `--config FILE` before jsonargparse reads it (a missing file, invalid YAML,
    not a mapping: one line naming the file); an empty file sets nothing and is dropped."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg[9:] if arg.startswith("--config=") \
            else None
        if path is None:
            out.append(arg)
            i += 1
            continue
        i += 2 if arg == "--config" else 1
        try:
            data = yaml.safe_load(open(path, encoding="utf-8"))  # noqa: SIM115 (read at once)
        except FileNotFoundError:
            raise UserError(f"{path}: no such config file") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}:" if mark is not None else ""
            raise UserError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise UserError(f"{path}: a config file is a YAML mapping of sections (model:, data:, optim:, ...) "
                            f"or options (epochs: 3), not a {type(data).__name__}")
        out += ["--config", path]
    return out


def _in_config(message: str, argv: list[str]) -> str:
    """Prefix a usage error about field `a.b` with the config file that sets it."""
    match = re.match(r"([a-z_]+(?:\.[a-z_]+)+)[: ]", message)
    if match is None:
        return message
    for path in (argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"):
        node: object = yaml.safe_load(open(path, encoding="utf-8"))  # noqa: SIM115 (read at once)
        for part in match.group(1).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return f"{path}: {message}"
    return message


def _user_errors() -> tuple[type[BaseException], ...]:
    from lmforge.dist import parallel
    from lmforge.train.loop import TrainingError

    return (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError,
            TrainingError, parallel.RankFailed)


def _one_line(e: BaseException) -> str | None:
    """The line a user sees for an error that is theirs (or their machine's: a full disk), else None."""
    if isinstance(e, _user_errors()):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return f"{e.filename or 'writing'}: {e.strerror}"
    if isinstance(e, MemoryError):
        return "out of memory (a model or batch too large for this machine?)"
    return None


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        argv = _config_files(_spellings(parser, argv))
        run, command_args = _resolve(COMMANDS, parser.parse_args(argv))
        run(command_args)
    except Exception as e:  # noqa: BLE001 (sorted below: the user's mistakes are one line, bugs a traceback)
        line = _one_line(e)
        line = line if line is None or "--config" not in argv else _in_config(line, argv)
        if line is None or os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge: error: {line}", file=sys.stderr)
        sys.exit(2)
