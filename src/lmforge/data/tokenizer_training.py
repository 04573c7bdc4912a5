"""Training a tokenizer on a corpus and measuring it: the `lmforge tokenizer train` command.

lmforge.tokenizer wraps and trains tokenizers on strings; this module brings it corpus files
(lmforge.data.sources reads them) and reports how well the result compresses them:
fertility (tokens per word, each CJK ideograph counting as a word), bytes and characters
per token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmforge.data.sources import InputSpec, iter_documents
from lmforge.tokenizer import Tokenizer, batched, train_tokenizer

_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef\U00030000-\U0003134f]")


def tokenizer_report(tokenizer: Tokenizer, texts: Iterable[str]) -> dict[str, float | int]:
    """Compression statistics of `tokenizer` on `texts`, special tokens not counted.

    tokens_per_word is the fertility: tokens per whitespace-separated word, where each CJK ideograph
    counts as one word (Chinese and Japanese are written without spaces). bytes_per_token counts
    UTF-8 bytes, chars_per_token Unicode characters.
    """
    n_texts = n_words = n_tokens = n_bytes = n_chars = 0
    for batch in batched(texts):
        n_tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch, add_special_tokens=False))
        for text in batch:
            n_texts += 1
            n_chars += len(text)
            n_bytes += len(text.encode("utf-8"))
            n_cjk = len(_CJK.findall(text))
            n_words += n_cjk + len((_CJK.sub(" ", text) if n_cjk else text).split())
    return {
        "vocab_size": tokenizer.vocab_size, "n_texts": n_texts, "n_words": n_words, "n_tokens": n_tokens,
        "tokens_per_word": n_tokens / max(n_words, 1), "bytes_per_token": n_bytes / max(n_tokens, 1),
        "chars_per_token": n_chars / max(n_tokens, 1),
    }


def train_tokenizer_files(inputs: InputSpec, kind: str = "bpe", vocab_size: int = 8000, *, field: str = "text",
                          doc_per_file: bool = False, **options: Any) -> Tokenizer:
    """`lmforge.tokenizer.train_tokenizer` on corpus files, directories or globs (any format of
    lmforge.data.sources, read with `field` and `doc_per_file`), streamed from disk."""
    return train_tokenizer(lambda: iter_documents(inputs, field=field, doc_per_file=doc_per_file), kind, vocab_size,
                           **options)


def train_tokenizer_command(inputs: list[str], kind: str = "bpe", vocab_size: int = 8000, out: str | Path = "tokenizer",
                            lowercase: bool = False, min_frequency: int = 2, special_tokens: list[str] | None = None,
                            field: str = "text", report_docs: int = 2000) -> dict[str, Any]:
    """Train a tokenizer on corpus files, save it to `out` (atomically) and return its report,
    measured on the first `report_docs` documents of the corpus, with ``"out"`` added."""
    tokenizer = train_tokenizer_files(inputs, kind, vocab_size, field=field, special_tokens=special_tokens,
                                      lowercase=lowercase, min_frequency=min_frequency, show_progress=True)
    tokenizer.save(out)
    sample = (doc for i, doc in zip(range(report_docs), iter_documents(inputs, field=field)))
    return {**tokenizer_report(tokenizer, sample), "out": str(out)}
