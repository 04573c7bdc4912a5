"""Tokenizers: a thin layer over Hugging Face `tokenizers`, plus training.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust pipeline: normalizer, pre-tokenizer,
model, post-processor, decoder) and adds what lmforge needs around it: named special
tokens (bos/eos/pad/unk/mask/cls/sep), a chat template, a content fingerprint that
prepared data is checked against, and loading/saving in the layout `transformers` reads
(tokenizer.json + tokenizer_config.json + special_tokens_map.json).

`train_tokenizer` trains one of three kinds on files or strings:

- ``"bpe"``: byte-level BPE as in GPT-2 (no unknown tokens; any UTF-8 text round-trips);
- ``"wordpiece"``: BERT's WordPiece, with BERT's normalizer (optional lowercasing, CJK
  characters split into single characters) and ``[CLS] A [SEP] B [SEP]`` templates;
- ``"unigram"``: the SentencePiece unigram model with ``▁`` marking word starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge import hub
from lmforge.files import atomic_write_text

SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "mask", "cls", "sep")
KINDS = ("bpe", "wordpiece", "unigram")

# Roles of well-known special tokens, used when a role is not stated (a bare tokenizer.json, or a list of specials).
_KNOWN_ROLES: dict[str, tuple[str, ...]] = {
    "<|endoftext|>": ("bos", "eos"), "<|pad|>": ("pad",), "<s>": ("bos",), "</s>": ("eos",), "<pad>": ("pad",),
    "<unk>": ("unk",), "<mask>": ("mask",), "[PAD]": ("pad",), "[UNK]": ("unk",), "[CLS]": ("cls",),
    "[SEP]": ("sep",), "[MASK]": ("mask",),
}
_DEFAULT_SPECIALS: dict[str, dict[str, str]] = {
    "bpe": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|pad|>"},
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    "unigram": {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "mask": "<mask>"},
}
# transformers tokenizer classes whose inputs have no token_type_ids even where their pipeline
# marks a second segment (DistilBERT's is BERT's, and its model takes no segments).
_NO_SEGMENT_CLASSES = {f"{name}{fast}" for name in ("DistilBertTokenizer", "RobertaTokenizer", "XLMRobertaTokenizer")
                       for fast in ("", "Fast")}
_NO_MAX_LENGTH = 10**12  # transformers writes a huge number (1e30) for "no limit"


# tokenizer_config.json fields a loaded tokenizer keeps for its next save (transformers reads them).
PASSTHROUGH = ("tokenizer_class", "model_input_names", "add_bos_token", "add_eos_token", "add_prefix_space",
               "padding_side", "truncation_side", "do_lower_case", "clean_up_tokenization_spaces", "legacy",
               "extra_special_tokens")


class _Special:
    """Descriptor: ``bos_token`` is the token string, ``bos_id`` its id; None when the tokenizer has no such token."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.role, self.kind = name.rsplit("_", 1)

    def __get__(self, obj: Tokenizer | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        token = obj.special_tokens.get(self.role)
        if self.kind == "token" or token is None:
            return token
        return obj.backend.token_to_id(token)


class Tokenizer:
    """A `tokenizers.Tokenizer` with named special tokens, a chat template and a fingerprint.

    backend: the Rust tokenizer (also reachable as ``self.backend``).
    special_tokens: role -> token string, roles from SPECIAL_ROLES; every token must be in the vocabulary.
    """

    bos_token, eos_token, pad_token, unk_token = _Special(), _Special(), _Special(), _Special()
    mask_token, cls_token, sep_token = _Special(), _Special(), _Special()
    bos_id, eos_id, pad_id, unk_id = _Special(), _Special(), _Special(), _Special()
    mask_id, cls_id, sep_id = _Special(), _Special(), _Special()

    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: Mapping[str, str | None] | None = None,
                 chat_template: str | None = None, model_max_length: int | None = None,
                 hf_config: Mapping[str, Any] | None = None) -> None:
        self.backend = backend
        # tokenizer_config.json fields transformers reads that lmforge keeps as it found them
        # (tokenizer_class, model_input_names, add_bos_token, ...), written back on save.
        self.hf_config = {k: v for k, v in (hf_config or {}).items() if k in PASSTHROUGH}
        self.special_tokens: dict[str, str] = {}
        for role, token in (special_tokens or {}).items():
            if role not in SPECIAL_ROLES:
                raise ValueError(f"unknown special token role {role!r}; expected one of {', '.join(SPECIAL_ROLES)}")
            if token is None:
                continue
            if backend.token_to_id(token) is None:
                raise ValueError(f"special token {role}={token!r} is not in the vocabulary")
            self.special_tokens[role] = token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        # Ids that also end generation besides EOS: an instruct model's end-of-turn tokens, from
        # its generation_config.json (lmforge.interop.model_dir sets them on load).
        self.end_ids: list[int] = []

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends generation: EOS first, then end_ids."""
        first = [] if self.eos_id is None else [self.eos_id]
        return first + [i for i in self.end_ids if i not in first]

    @property
    def model_input_names(self) -> list[str]:
        """What transformers' tokenizer returns: token_type_ids too when the tokenizer marks a
        second segment (BERT's sentence pairs), as lmforge's own tasks feed them, unless its
        transformers class leaves them out (DistilBERT's, RoBERTa's)."""
        if "model_input_names" in self.hf_config:
            return list(self.hf_config["model_input_names"])
        if self.hf_config.get("tokenizer_class") in _NO_SEGMENT_CLASSES:
            return ["input_ids", "attention_mask"]
        processor = type(self.backend.post_processor).__name__
        marks = processor in ("TemplateProcessing", "BertProcessing") and any(self.backend.encode("a", "b").type_ids)
        return ["input_ids", *(["token_type_ids"] if marks else []), "attention_mask"]

    # ---- encoding and decoding -------------------------------------------------------------------------------
    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (and `pair`, for two-segment inputs such as BERT's)."""
        return self.backend.encode(text, pair, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                     add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of many texts at once (Rust threads; offsets are not computed, which saves time)."""
        fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in fast(self._batch_inputs(texts, pairs), add_special_tokens=add_special_tokens)]

    def encodings(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                  add_special_tokens: bool = True) -> list[tokenizers.Encoding]:
        """Full encodings: ids, type_ids, offsets (character spans), word_ids, special_tokens_mask, ..."""
        return self.backend.encode_batch(self._batch_inputs(texts, pairs), add_special_tokens=add_special_tokens)

    @staticmethod
    def _batch_inputs(texts: Sequence[str], pairs: Sequence[str] | None) -> list:
        if isinstance(texts, str):
            raise TypeError("encode_batch/encodings take a list of texts; use encode for a single text")
        if pairs is None:
            return list(texts)
        if len(pairs) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(pairs)} pairs")
        return list(zip(texts, pairs))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (a list, numpy array or 1-D tensor)."""
        return self.backend.decode(_as_int_list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.backend.decode_batch([_as_int_list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(id)

    # ---- properties ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (every id is below this)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_ids(self) -> set[int]:
        """Ids of the role tokens and of every added token marked special."""
        ids = {self.backend.token_to_id(t) for t in self.special_tokens.values()}
        ids |= {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}
        return ids

    @property
    def fingerprint(self) -> str:
        """Stable hash of what decides the ids: the tokenizer pipeline and vocabulary, and the special roles.

        Independent of runtime settings (padding, truncation) and of the chat template; equal after a
        save/load round trip. Prepared data records it so data tokenized differently is refused.
        """
        content = json.loads(self.backend.to_str())
        for runtime_key in ("truncation", "padding", "version"):
            content.pop(runtime_key, None)
        content["lmforge_special_tokens"] = dict(sorted(self.special_tokens.items()))
        blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        model = type(self.backend.model).__name__
        specials = ", ".join(f"{r}={t!r}" for r, t in self.special_tokens.items())
        return f"Tokenizer({model}, vocab_size={self.vocab_size}, {specials})"

    # ---- loading and saving ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, padding_from_file: bool = False) -> Tokenizer:
        """Load from a directory (or a file in it) holding tokenizer.json, vocab.json + merges.txt
        (GPT-2 byte-level BPE) or vocab.txt (BERT WordPiece), or from a Hugging Face Hub id.
        Special tokens, chat template and model_max_length come from tokenizer_config.json /
        special_tokens_map.json when present.

        Padding and truncation stored in tokenizer.json (a sentence-transformers model's "pad to
        128, truncate at 128") are ignored, as transformers ignores them, unless padding_from_file.
        """
        path = Path(path)
        if not path.exists():
            if not hub.is_hub_id(str(path)):
                raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
            path = hub.resolve(path, files=hub.TOKENIZER_FILES)
        directory = path.parent if path.is_file() else path
        config = _read_config(directory)
        specials = {r: config[f"{r}_token"] for r in SPECIAL_ROLES if config.get(f"{r}_token")}
        chosen = (directory / "vocab.json" if path.name == "merges.txt" else path) if path.is_file() else None
        if chosen is None:
            for name in ("tokenizer.json", "vocab.json", "vocab.txt"):
                if (directory / name).is_file():
                    chosen = directory / name
                    break
            else:
                raise FileNotFoundError(f"{directory}: no tokenizer found (expected tokenizer.json, "
                                        "vocab.json + merges.txt, or vocab.txt)")
        if chosen.name == "vocab.json":
            backend = _load_gpt2_files(chosen, directory / "merges.txt")
            if specials.get("cls") and specials.get("sep"):  # RoBERTa's files: <s> A </s></s> B </s>
                _roberta_pipeline(backend, specials["cls"], specials["sep"], bool(config.get("add_prefix_space")),
                                  bool(config.get("trim_offsets", True)))
        elif chosen.suffix == ".txt":
            backend, bert_specials = _load_bert_vocab(chosen, bool(config.get("do_lower_case", True)), specials)
            specials = {**bert_specials, **specials}
        else:
            try:
                backend = tokenizers.Tokenizer.from_file(str(chosen))
            except Exception as e:  # tokenizers raises a bare Exception for unparsable files
                raise ValueError(f"{chosen}: not a valid tokenizer.json ({e})") from None
        if not specials:  # no configuration: recognise well-known special tokens, registered ones first
            added = [t.content for t in backend.get_added_tokens_decoder().values()]
            specials = _guess_roles(backend, added + list(_KNOWN_ROLES))
        specials = {r: t for r, t in specials.items() if backend.token_to_id(t) is not None}
        backend.add_special_tokens(sorted(set(specials.values())))  # no-op when already registered as special
        if not padding_from_file:
            backend.no_padding()
            backend.no_truncation()
        max_len = config.get("model_max_length")
        max_len = int(max_len) if isinstance(max_len, int | float) and max_len < _NO_MAX_LENGTH else None
        return cls(backend, specials, chat_template=config.get("chat_template"), model_max_length=max_len,
                   hf_config=config)

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, atomically.

        The layout loads in `transformers` (``AutoTokenizer.from_pretrained(directory)``) and encodes
        identically. Returns the directory.
        """
        specials = {f"{role}_token": tok for role, tok in self.special_tokens.items()}
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
                                  "clean_up_tokenization_spaces": False,
                                  "model_input_names": self.model_input_names, **self.hf_config}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        files = {
            "tokenizer.json": self.backend.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False),
        }
        return write_files_atomically(directory, files)


def write_files_atomically(directory: str | Path, files: Mapping[str, str]) -> Path:
    """Write text files into `directory`, each replaced by rename: no reader ever sees a
    half-written file."""
    for name, text in files.items():
        atomic_write_text(Path(directory) / name, text)
    return Path(directory)


def _as_int_list(ids: Iterable[int]) -> list[int]:
    tolist = getattr(ids, "tolist", None)  # numpy arrays and torch tensors
    return tolist() if tolist is not None else [int(i) for i in ids]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _read_config(directory: Path) -> dict:
    """special_tokens_map.json overlaid by tokenizer_config.json; token entries flattened to strings."""
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            config.update(_read_json(directory / name))
    for key, value in list(config.items()):
        if key.endswith("_token") and isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
            config[key] = value.get("content")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        config["chat_template"] = named.get("default")
    if config.get("chat_template") is None and (directory / "chat_template.jinja").is_file():
        config["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return config


def _guess_roles(backend: tokenizers.Tokenizer, tokens: Iterable[str]) -> dict[str, str]:
    roles: dict[str, str] = {}
    for token in tokens:
        for role in _KNOWN_ROLES.get(token, ()):
            if backend.token_to_id(token) is not None:
                roles.setdefault(role, token)
    return roles


def _load_gpt2_files(vocab: Path, merges: Path) -> tokenizers.Tokenizer:
    if not merges.is_file():
        raise FileNotFoundError(f"{merges}: missing (vocab.json needs merges.txt beside it)")
    try:
        backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:  # tokenizers raises a bare Exception for unparsable files
        raise ValueError(f"{vocab} / {merges}: not a valid BPE vocabulary ({e})") from None
    _byte_level_pipeline(backend)
    return backend


def _roberta_pipeline(backend: tokenizers.Tokenizer, cls: str, sep: str, add_prefix_space: bool,
                      trim_offsets: bool) -> None:
    """Byte-level BPE with RoBERTa's templates: <s> A </s> and <s> A </s></s> B </s>, one segment."""
    cls_id, sep_id = backend.token_to_id(cls), backend.token_to_id(sep)
    if cls_id is None or sep_id is None:
        return
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.post_processor = processors.RobertaProcessing((sep, sep_id), (cls, cls_id), trim_offsets=trim_offsets,
                                                          add_prefix_space=add_prefix_space)


def _load_bert_vocab(vocab: Path, lowercase: bool, specials: Mapping[str, str]) -> tuple[tokenizers.Tokenizer, dict]:
    roles = {**_DEFAULT_SPECIALS["wordpiece"], **specials}
    try:
        backend = tokenizers.Tokenizer(models.WordPiece.from_file(str(vocab), unk_token=roles["unk"]))
    except Exception as e:  # tokenizers raises a bare Exception for unparsable files
        raise ValueError(f"{vocab}: not a valid WordPiece vocabulary ({e})") from None
    if backend.token_to_id(roles["cls"]) is None or backend.token_to_id(roles["sep"]) is None:
        raise ValueError(f"{vocab}: no {roles['cls']} / {roles['sep']} tokens, needed for BERT inputs")
    _bert_pipeline(backend, lowercase, roles["cls"], roles["sep"])
    return backend, roles


def _byte_level_pipeline(backend: tokenizers.Tokenizer) -> None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)


def _bert_pipeline(backend: tokenizers.Tokenizer, lowercase: bool, cls: str, sep: str) -> None:
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = backend.token_to_id(cls), backend.token_to_id(sep)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)],
    )


# ---- training --------------------------------------------------------------------------------------------------
def parse_special_tokens(special_tokens: Sequence[str] | Mapping[str, str] | None, kind: str) -> dict[str, str]:
    """Role -> token. A mapping is taken as is; list items are ``role=token`` or a bare token whose role
    is known by name (``<|endoftext|>``, ``[CLS]``, ``</s>``, ...). None gives the kind's defaults."""
    if special_tokens is None:
        return dict(_DEFAULT_SPECIALS[kind])
    if isinstance(special_tokens, Mapping):
        return dict(special_tokens)
    roles: dict[str, str] = {}
    for item in special_tokens:
        role, sep, token = item.partition("=")
        if sep and role in SPECIAL_ROLES:
            roles[role] = token
        else:
            for guessed in _KNOWN_ROLES.get(item, ()):
                roles.setdefault(guessed, item)
    return roles


def _special_list(roles: Mapping[str, str], extra: Iterable[str]) -> list[str]:
    """Specials in a stable order (pad first, as id 0 is the convention), without duplicates."""
    order = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
    ordered = [roles[r] for r in order if r in roles] + list(extra)
    return list(dict.fromkeys(ordered))


def batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    """Lists of up to `size` texts (the unit tokenizers' batch calls take)."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer(texts: Iterable[str] | Callable[[], Iterable[str]] | None = None, kind: str = "bpe",
                    vocab_size: int = 8000, *, special_tokens: Sequence[str] | Mapping[str, str] | None = None,
                    lowercase: bool = False, min_frequency: int = 2, model_max_length: int | None = None,
                    show_progress: bool = False) -> Tokenizer:
    """Train a tokenizer of `kind` ("bpe", "wordpiece" or "unigram") with `vocab_size` ids on `texts`.

    texts: an iterable of strings (documents), or a function returning a fresh one each call
        (WordPiece reads the corpus twice: a list is kept in memory, a function re-reads).
        Files: lmforge.data.tokenizer_training.train_tokenizer_files.
    special_tokens: see `parse_special_tokens`. Defaults: bpe ``<|endoftext|>`` (bos and eos) and a
        distinct ``<|pad|>`` (so that fine-tuned models see a real end of text and learn to stop);
        wordpiece ``[PAD] [UNK] [CLS] [SEP] [MASK]``; unigram ``<pad> <unk> <s> </s> <mask>``.
    lowercase: lowercase before tokenizing (wordpiece also strips accents then, as BERT uncased does).
    min_frequency: pairs (bpe, wordpiece) seen fewer times are not merged.
    show_progress: the trainer's progress bars.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if texts is None:
        raise ValueError("train_tokenizer needs texts (strings, or a function giving them); for files use "
                         "lmforge.data.tokenizer_training.train_tokenizer_files")
    roles = parse_special_tokens(special_tokens, kind)
    extra = [t for t in (special_tokens or []) if not isinstance(special_tokens, Mapping) and "=" not in t]
    specials = _special_list(roles, extra)
    if vocab_size <= len(specials) + (256 if kind == "bpe" else 0):
        raise ValueError(f"vocab_size {vocab_size} is too small for {kind} with {len(specials)} special tokens")
    if kind == "wordpiece" and not callable(texts) and not isinstance(texts, Sequence):
        texts = list(texts)  # read twice

    def docs() -> Iterator[str]:
        return iter(texts() if callable(texts) else texts)

    pieces: list[str] = []
    if kind == "wordpiece":
        pieces = _continuation_pieces(docs(), roles, specials, min_frequency, lowercase)
    backend, trainer = _untrained(kind, roles, specials + pieces, vocab_size, min_frequency, lowercase, show_progress)
    backend.train_from_iterator(batched(docs()), trainer=trainer)
    if kind == "wordpiece":
        backend = _canonical_wordpiece(backend, roles, specials, lowercase)
    elif kind == "unigram":
        _canonical_unigram(backend, len(specials))
    return Tokenizer(backend, roles, model_max_length=model_max_length)


def _canonical_unigram(backend: tokenizers.Tokenizer, n_special: int) -> None:
    """Round a trained Unigram model's log-probabilities to 9 decimals and order pieces by score,
    then text. The trainer sums in parallel, so scores differ run to run in the last bits and
    near-equal pieces swap ids; rounded, the same corpus gives the same file."""
    model = json.loads(backend.to_str())["model"]
    specials, rest = model["vocab"][:n_special], model["vocab"][n_special:]
    rest = sorted(((t, round(score, 9)) for t, score in rest), key=lambda p: (-p[1], p[0]))
    backend.model = models.Unigram([(t, score) for t, score in specials] + rest, unk_id=model["unk_id"],
                                   byte_fallback=model["byte_fallback"])


def _continuation_pieces(docs: Iterator[str], roles: Mapping[str, str], specials: list[str], min_frequency: int,
                         lowercase: bool) -> list[str]:
    """The single-character "##" pieces a WordPiece vocabulary of this corpus starts from, sorted.

    `tokenizers`' WordPiece trainer numbers these pieces in hash-map order, which differs run to
    run (huggingface/tokenizers#1794), and breaks ties between equally frequent merges by those
    numbers, so the same corpus could give a different vocabulary each time. A first pass with
    no merges finds the pieces; the real pass gets them, in sorted order, ahead of everything
    else, which makes every number and so every tie-break the same run to run."""
    backend, trainer = _untrained("wordpiece", roles, specials, len(specials) + 1, min_frequency, lowercase, False)
    backend.train_from_iterator(batched(docs), trainer=trainer)
    vocab = backend.get_vocab(with_added_tokens=False)
    return sorted(t for t in vocab if t.startswith("##") and len(t) == 3 and t not in specials)


def _canonical_wordpiece(trained: tokenizers.Tokenizer, roles: Mapping[str, str], specials: list[str],
                         lowercase: bool) -> tokenizers.Tokenizer:
    """The trained WordPiece vocabulary under ids in a fixed order, with only `specials` as added
    tokens (training registered the "##" pieces of `_continuation_pieces` as added tokens too).
    Special tokens keep their ids, whole-word pieces come before "##" pieces, each group by
    length, then text; WordPiece encodes by longest match over the vocabulary, so the order
    changes nothing but the ids."""
    vocab = trained.get_vocab(with_added_tokens=False)
    rest = sorted((t for t in vocab if t not in specials), key=lambda t: (t.startswith("##"), len(t), t))
    ordered = sorted(specials, key=vocab.__getitem__) + rest
    backend = tokenizers.Tokenizer(models.WordPiece({t: i for i, t in enumerate(ordered)}, unk_token=roles["unk"],
                                                    continuing_subword_prefix="##"))
    backend.add_special_tokens(ordered[:len(specials)])
    _bert_pipeline(backend, lowercase, roles["cls"], roles["sep"])
    return backend


def _untrained(kind: str, roles: Mapping[str, str], specials: list[str], vocab_size: int, min_frequency: int,
               lowercase: bool, show_progress: bool) -> tuple[tokenizers.Tokenizer, trainers.Trainer]:
    common = {"vocab_size": vocab_size, "special_tokens": specials, "show_progress": show_progress}
    if kind == "bpe":
        backend = tokenizers.Tokenizer(models.BPE())
        _byte_level_pipeline(backend)
        if lowercase:
            backend.normalizer = normalizers.Lowercase()
        trainer = trainers.BpeTrainer(min_frequency=min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      **common)
    elif kind == "wordpiece":
        missing = [r for r in ("unk", "cls", "sep") if r not in roles]
        if missing:
            raise ValueError(f"wordpiece needs special tokens for roles {', '.join(missing)}")
        backend = tokenizers.Tokenizer(models.WordPiece(unk_token=roles["unk"]))
        backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                        strip_accents=None, lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(min_frequency=min_frequency, continuing_subword_prefix="##", **common)
    else:
        backend = tokenizers.Tokenizer(models.Unigram())
        steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        backend.normalizer = normalizers.Sequence(steps)
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(unk_token=roles.get("unk"), **common)
    return backend, trainer


# ---- reports and the CLI entry point ---------------------------------------------------------------------------
