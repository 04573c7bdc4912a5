"""The tokenizers of RoBERTa, XLM-RoBERTa and DistilBERT as transformers' AutoTokenizer sees
them: tiny ones trained with `tokenizers`, saved by transformers' own classes, read by
lmforge (ids of texts and pairs, model_input_names), and saved by lmforge for
AutoTokenizer again."""

import json
from importlib import resources

import pytest
from tokenizers import SentencePieceUnigramTokenizer, Tokenizer, models, pre_tokenizers, trainers

from lmforge.tokenizer import Tokenizer as LmTokenizer

hf = pytest.importorskip("transformers")
hf.logging.set_verbosity_error()

TEXT = (resources.files("lmforge") / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
LINES = [line for line in TEXT.splitlines() if line.strip()][:1500]
SAMPLES = [("Hello there, ROMEO! Wherefore art thou?", "A plague o' both your houses."),
           ("  two  spaces and caf\u00e9 ", "x"), ("Good night, good night!", "Parting is such sweet sorrow")]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _roberta():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(LINES, trainers.BpeTrainer(vocab_size=400, special_tokens=ROBERTA_SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    return hf.RobertaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


def _xlm_roberta():
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(LINES, vocab_size=300, special_tokens=ROBERTA_SPECIALS, unk_token="<unk>")
    return hf.XLMRobertaTokenizer(vocab=[tuple(p) for p in json.loads(sp.to_str())["model"]["vocab"]])


def _distilbert():
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(LINES, trainers.WordPieceTrainer(vocab_size=400, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    return hf.DistilBertTokenizer(vocab=wp.get_vocab())


MAKERS = {"roberta": _roberta, "xlm-roberta": _xlm_roberta, "distilbert": _distilbert}


def _same_as_transformers(ours: LmTokenizer, theirs) -> None:
    assert ours.model_input_names == theirs.model_input_names == ["input_ids", "attention_mask"]
    for a, b in SAMPLES:
        assert ours.encode(a) == theirs(a)["input_ids"]
        assert ours.encode(a, b) == theirs(a, b)["input_ids"]
        assert ours.decode(ours.encode(a, b)) == theirs.decode(theirs(a, b)["input_ids"], skip_special_tokens=True)
    assert [ours.pad_id, ours.mask_id, ours.cls_id, ours.sep_id] == \
        [theirs.pad_token_id, theirs.mask_token_id, theirs.cls_token_id, theirs.sep_token_id]


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_encodes_as_transformers_and_saves_what_it_reads(kind, tmp_path):
    theirs = MAKERS[kind]()
    theirs.save_pretrained(tmp_path / "theirs")
    auto = hf.AutoTokenizer.from_pretrained(tmp_path / "theirs")
    ours = LmTokenizer.from_pretrained(tmp_path / "theirs")
    _same_as_transformers(ours, auto)
    if kind != "distilbert":  # RoBERTa's pairs: <s> A </s></s> B </s>, no second segment
        ids = ours.encode("a", "b")
        assert ids[0] == ours.cls_id and ids.count(ours.sep_id) == 3
    ours.save(tmp_path / "ours")
    again = hf.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert type(again) is type(auto)
    _same_as_transformers(ours, again)
    assert set(again("a", "b")) == {"input_ids", "attention_mask"}  # what the model's forward takes


def test_roberta_vocab_and_merges_files_get_roberta_templates(tmp_path):
    """A RoBERTa directory with only vocab.json and merges.txt (no tokenizer.json) still
    adds <s> and </s> as RobertaTokenizer does."""
    theirs = _roberta()
    theirs.save_pretrained(tmp_path)
    model = json.loads((tmp_path / "tokenizer.json").read_text())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tmp_path / "tokenizer.json").unlink()
    ours = LmTokenizer.from_pretrained(tmp_path)
    for a, b in SAMPLES:
        assert ours.encode(a, b) == theirs(a, b)["input_ids"]
