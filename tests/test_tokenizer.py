"""Tokenizer: training (bpe / wordpiece / unigram, English and Chinese), loading every layout,
saving in the layout transformers reads, and encoding identically to transformers."""

import importlib.resources
import json
import unicodedata

import pytest
from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer

from lmforge.data.tokenizer_training import tokenizer_report, train_tokenizer_command
from lmforge.tokenizer import Tokenizer, train_tokenizer

SHAKESPEARE = importlib.resources.files("lmforge") / "corpus" / "tinyshakespeare.txt"
CHINESE = [
    "春天来了，花园里的花都开了。", "小明每天早上七点起床，然后去学校上课。", "我们今天下午去公园散步，天气非常好。",
    "他喜欢读书，也喜欢写字和画画。", "这家饭店的菜很好吃，价格也不贵。", "妈妈在厨房里做饭，爸爸在客厅看报纸。",
    "学习语言需要时间和耐心。", "北京是中国的首都，有很多历史名胜。", "昨天晚上下了一场大雨，街上到处都是水。",
    "朋友们一起唱歌跳舞，度过了一个愉快的晚上。", "老师告诉我们要认真完成作业。", "秋天的树叶变成了红色和黄色。",
    "我想去图书馆借几本关于历史的书。", "火车站离这里不远，走路十分钟就到了。", "孩子们在河边玩水，笑声传得很远。",
]
# Held back from training: the transformers parity check encodes text the tokenizer has not seen.
HELD_ENGLISH = "The quick brown fox, unafraid of kings, jumps over the lazy dog at 3:45pm!"
HELD_CHINESE = "今天天气很好，我们一起去图书馆看书，然后在公园里散步。"


def chinese_corpus(repeats: int = 12) -> list[str]:
    """A few thousand characters of varied sentences: rotated and paired so that merges have counts."""
    return [CHINESE[i % len(CHINESE)] + CHINESE[(i * 7 + 3) % len(CHINESE)] for i in range(len(CHINESE) * repeats)]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    texts = SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") + chinese_corpus()
    return train_tokenizer(texts=texts, kind="bpe", vocab_size=1200)


@pytest.fixture(scope="module")
def wordpiece() -> Tokenizer:
    texts = SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") + chinese_corpus()
    return train_tokenizer(texts=texts, kind="wordpiece", vocab_size=1200, lowercase=True)


def test_bpe_defaults_and_exact_round_trip(bpe):
    assert (bpe.bos_token, bpe.eos_token, bpe.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert bpe.bos_id == bpe.eos_id != bpe.pad_id and bpe.unk_id is None and bpe.cls_id is None
    assert bpe.special_ids == {bpe.eos_id, bpe.pad_id}
    assert bpe.vocab_size == len(bpe.backend.get_vocab(with_added_tokens=True)) == 1200
    for text in (HELD_ENGLISH, HELD_CHINESE, "emoji \U0001f600 and tabs\t\n  spaces", "mixed 中文 text"):
        assert bpe.decode(bpe.encode(text)) == text  # byte-level: every string round-trips
    # Special tokens are atomic in text and dropped by decode unless asked for.
    ids = bpe.encode("end<|endoftext|>")
    assert ids[-1] == bpe.eos_id
    assert bpe.decode(ids) == "end" and bpe.decode(ids, skip_special_tokens=False) == "end<|endoftext|>"


def test_bpe_trained_on_chinese_merges_characters():
    tok = train_tokenizer(texts=chinese_corpus(), kind="bpe", vocab_size=600)
    ids = tok.encode(CHINESE[0])
    assert tok.decode(ids) == CHINESE[0]
    assert len(ids) < len(CHINESE[0].encode("utf-8")) / 2  # merges beyond single bytes were learned


def test_wordpiece_bert_style(wordpiece):
    wp = wordpiece
    assert (wp.pad_id, wp.unk_id, wp.cls_id, wp.sep_id, wp.mask_id) == (0, 1, 2, 3, 4)
    enc = wordpiece.encodings(["Hello World 今天好"], ["second part"])[0]
    assert enc.tokens[0] == "[CLS]" and enc.tokens.count("[SEP]") == 2 and enc.tokens[-1] == "[SEP]"
    first_sep = enc.tokens.index("[SEP]")
    assert enc.type_ids == [0] * (first_sep + 1) + [1] * (len(enc.tokens) - first_sep - 1)
    assert enc.special_tokens_mask[0] == 1 and enc.special_tokens_mask[1] == 0
    assert wordpiece.decode(enc.ids[first_sep + 1:]) == "second part"
    assert ["今", "天", "好"] == enc.tokens[first_sep - 3:first_sep]  # CJK characters split one by one
    # Offsets point back into the original (cased) text; word ids group word pieces.
    text = "Hello World 今天好"
    words = {}
    for (start, end), word in zip(enc.offsets[1:first_sep], enc.word_ids[1:first_sep]):
        words.setdefault(word, []).append(text[start:end])
    assert ["".join(p) for p in words.values()] == ["Hello", "World", "今", "天", "好"]
    assert wordpiece.encode("HELLO world") == wordpiece.encode("hello WORLD")  # lowercase=True
    assert wordpiece.decode(wordpiece.encode("Hello World")) == "hello world"


def test_wordpiece_keeps_case_without_lowercase():
    tok = train_tokenizer(texts=["Hello hello HELLO world"] * 50, kind="wordpiece", vocab_size=100)
    assert tok.encode("Hello", add_special_tokens=False) != tok.encode("hello", add_special_tokens=False)


def test_unigram_english_and_chinese():
    lines = SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")[:800]
    tok = train_tokenizer(texts=lines + chinese_corpus(), kind="unigram", vocab_size=800)
    assert (tok.pad_id, tok.unk_id, tok.bos_token, tok.eos_token, tok.mask_token) == (0, 1, "<s>", "</s>", "<mask>")
    for text in ("First Citizen: speak, speak.", CHINESE[3]):
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == unicodedata.normalize("NFKC", text)  # full-width punctuation becomes ASCII


def test_custom_special_tokens():
    texts = ["a chat <|im_start|> with tokens", "plain text here"] * 20
    tok = train_tokenizer(texts=texts, kind="bpe", vocab_size=300,
                          special_tokens=["eos=</s>", "<|pad|>", "<|im_start|>"])
    assert tok.eos_token == "</s>" and tok.pad_token == "<|pad|>" and tok.bos_id is None
    im = tok.token_to_id("<|im_start|>")
    assert im in tok.special_ids and tok.encode("x<|im_start|>y").count(im) == 1
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(texts=texts, kind="bpe", vocab_size=200)
    with pytest.raises(ValueError, match="train_tokenizer needs texts"):
        train_tokenizer(kind="bpe", vocab_size=300)
    with pytest.raises(ValueError, match="kind must be one of"):
        train_tokenizer(texts=texts, kind="sentencepiece")


def test_save_load_round_trip(bpe, tmp_path):
    bpe.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    bpe.model_max_length = 256
    bpe.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.fingerprint == bpe.fingerprint
    assert (loaded.chat_template, loaded.model_max_length) == (bpe.chat_template, 256)
    assert loaded.special_tokens == bpe.special_tokens
    assert loaded.encode(HELD_ENGLISH) == bpe.encode(HELD_ENGLISH)
    assert Tokenizer.from_pretrained(tmp_path / "tok" / "tokenizer.json").fingerprint == bpe.fingerprint
    bpe.save(tmp_path / "tok")  # saving over an existing directory replaces the files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    bpe.chat_template, bpe.model_max_length = None, None


def test_fingerprint_tells_tokenizers_apart(bpe, wordpiece):
    other = train_tokenizer(texts=chinese_corpus(), kind="bpe", vocab_size=600)
    assert len({bpe.fingerprint, wordpiece.fingerprint, other.fingerprint}) == 3
    bpe.backend.enable_truncation(8)  # runtime settings do not change which ids a text maps to
    try:
        assert bpe.fingerprint == Tokenizer(bpe.backend, bpe.special_tokens).fingerprint
    finally:
        bpe.backend.no_truncation()


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_transformers_loads_and_encodes_identically(bpe, wordpiece, kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    base = bpe if kind == "bpe" else wordpiece
    ours = Tokenizer(base.backend, base.special_tokens, chat_template=template)
    ours.save(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in (HELD_ENGLISH, HELD_CHINESE):
        assert auto(text)["input_ids"] == ours.encode(text)
        assert fast(text)["input_ids"] == ours.encode(text)
        assert auto.decode(ours.encode(text), skip_special_tokens=True) == ours.decode(ours.encode(text))
    assert auto(HELD_ENGLISH, HELD_CHINESE)["input_ids"] == ours.encode(HELD_ENGLISH, HELD_CHINESE)
    assert auto.eos_token == ours.eos_token and auto.pad_token == ours.pad_token and auto.cls_token == ours.cls_token
    messages = [{"role": "user", "content": "hi"}]
    assert auto.apply_chat_template(messages, tokenize=False) == "<|user|>hi"
    auto.save_pretrained(tmp_path / "resaved")  # and back: transformers' own layout loads in lmforge
    back = Tokenizer.from_pretrained(tmp_path / "resaved")
    assert back.fingerprint == ours.fingerprint and back.chat_template == template


def test_load_gpt2_vocab_and_merges(tmp_path):
    reference = ByteLevelBPETokenizer()
    reference.train_from_iterator(chinese_corpus() + ["hello world"] * 20, vocab_size=400,
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    reference.save_model(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    tok = Tokenizer.from_pretrained(tmp_path)
    for text in (HELD_CHINESE, "hello world, again"):
        assert tok.encode(text) == reference.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_id == reference.token_to_id("<|endoftext|>")
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"merges\.txt: missing"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("lower", [True, False, None])
def test_load_bert_vocab_txt(tmp_path, lower):
    trained = BertWordPieceTokenizer(lowercase=True if lower is None else lower)
    trained.train_from_iterator(["Hello World of Words", "今天好 world"] * 30, vocab_size=120, show_progress=False)
    trained.save_model(str(tmp_path))
    reference = BertWordPieceTokenizer(str(tmp_path / "vocab.txt"), lowercase=True if lower is None else lower)
    if lower is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
    tok = Tokenizer.from_pretrained(tmp_path)  # do_lower_case defaults to True, as in BERT
    for text, pair in (("Hello World", None), ("今天 Words", "world")):
        assert tok.encode(text, pair) == reference.encode(text, pair).ids
    assert tok.encodings(["Hello", "x"], ["World", "y"])[0].type_ids == reference.encode("Hello", "World").type_ids
    assert (tok.cls_token, tok.sep_token, tok.mask_token) == ("[CLS]", "[SEP]", "[MASK]")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such tokenizer"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path.name}: no tokenizer found"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)


def test_tokenizer_report_counts(wordpiece):
    texts = ["hello world", "今天 好 ok"]
    report = tokenizer_report(wordpiece, texts)
    n_tokens = sum(len(wordpiece.encode(t, add_special_tokens=False)) for t in texts)
    assert report["n_texts"] == 2 and report["n_words"] == 2 + 4  # each CJK character is one word
    assert report["n_tokens"] == n_tokens
    assert report["tokens_per_word"] == pytest.approx(n_tokens / 6)
    assert report["bytes_per_token"] == pytest.approx(len("".join(texts).encode()) / n_tokens)
    assert report["chars_per_token"] == pytest.approx(len("".join(texts)) / n_tokens)


def test_train_tokenizer_command_from_files(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": s}) for s in chinese_corpus(4)), encoding="utf-8")
    report = train_tokenizer_command([str(corpus)], kind="wordpiece", vocab_size=300, out=tmp_path / "out",
                                     field="body", report_docs=10)
    assert report["n_texts"] == 10 and report["out"] == str(tmp_path / "out")
    tok = Tokenizer.from_pretrained(tmp_path / "out")
    assert tok.vocab_size == report["vocab_size"] and tok.cls_token == "[CLS]"


def test_training_is_reproducible(shared_data):
    """tokenizers numbers WordPiece's "##" pieces in hash-map order and breaks ties between equally
    frequent merges by those numbers (huggingface/tokenizers#1794), so on a small corpus full of
    ties the same text gave a different vocabulary run to run. lmforge's does not, nor does unigram."""
    text = (shared_data / "wnut17" / "wnut17train.conll").read_text(encoding="utf-8")
    sentences = [" ".join(line.split("\t")[0] for line in block.splitlines())
                 for block in text.split("\n\n")[:600] if block.strip()]
    vocabs = [train_tokenizer(texts=iter(sentences), kind="wordpiece", vocab_size=1500, min_frequency=1)
              .backend.get_vocab() for _ in range(4)]
    assert vocabs[0] == vocabs[1] == vocabs[2] == vocabs[3] and len(vocabs[0]) == 1500
    ids = sorted(vocabs[0], key=vocabs[0].__getitem__)
    assert ids[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = [t for t in ids if t.startswith("##")]
    assert ids[-len(pieces):] == pieces  # whole-word pieces first, then "##" pieces, each by length
    assert [len(p) for p in pieces] == sorted(len(p) for p in pieces)
    tok = train_tokenizer(texts=sentences, kind="wordpiece", vocab_size=1500, min_frequency=1)
    # Unigram sums in parallel: scores differed in the last bits and near-equal pieces swapped ids.
    unigrams = [train_tokenizer(texts=sentences, kind="unigram", vocab_size=1500).backend.to_str() for _ in range(3)]
    assert unigrams[0] == unigrams[1] == unigrams[2]
    # The "##" pieces the trainer was seeded with are vocabulary, not special tokens matched in text.
    assert tok.backend.encode("##e", add_special_tokens=False).tokens == ["#", "#", "e"]
    assert sorted(tok.special_ids) == [0, 1, 2, 3, 4]
