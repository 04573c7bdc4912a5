"""Task data as Hugging Face users keep it (lmforge.data.datasets_io through the readers):
Parquet files, save_to_disk directories and Hub ids resolved offline from a cache laid out by
`datasets` itself, with ClassLabels decoded, column renames, and one-line errors naming the
row or the missing column."""

import pytest

from lmforge.data.datasets_io import is_dataset_source, parse_columns
from lmforge.data.readers import read_chat, read_classification, read_conll, read_seq2seq, read_squad

datasets = pytest.importorskip("datasets")
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value  # noqa: E402

TOPICS = ["World", "Sports", "Business", "Sci/Tech"]


def news(n=8, offset=0):
    return Dataset.from_dict(
        {"text": [f"headline number {i}" for i in range(offset, offset + n)], "label": [i % 4 for i in range(n)]},
        features=Features({"text": Value("string"), "label": ClassLabel(names=TOPICS)}))


def ner_rows():
    tags = ["O", "B-person", "I-person", "B-location", "I-location"]
    return Dataset.from_dict({"tokens": [["Anna", "Berg", "lives", "in", "Oslo"], ["hello", "world"]],
                              "ner_tags": [[1, 2, 0, 0, 3], [0, 0]]},
                             features=Features({"tokens": List(Value("string")),
                                                "ner_tags": List(ClassLabel(names=tags))}))


def squad_rows():
    context = "Anna Berg was born in Oslo."
    return Dataset.from_dict({"id": ["q1", "q2"], "title": ["Anna", "Anna"], "context": [context, context],
                              "question": ["Where was Anna born?", "When did Anna die?"],
                              "answers": [{"text": ["Oslo"], "answer_start": [22]}, {"text": [], "answer_start": []}]})


@pytest.fixture
def offline_hub(hub_cache):
    return hub_cache("lmforge-tests/news", {"train": news(8), "test": news(4, 100)})


def test_parquet_file_with_class_labels(tmp_path):
    path = tmp_path / "train.parquet"
    news().to_parquet(path)
    data = read_classification(path)
    assert data.texts[0] == "headline number 0" and len(data) == 8
    assert data.label_names == sorted(TOPICS) and data.label_names[data.labels[1]] == "Sports"


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    news().save_to_disk(tmp_path / "one")
    DatasetDict({"train": news(8), "validation": news(4, 50)}).save_to_disk(tmp_path / "dict")
    assert len(read_classification(tmp_path / "one")) == 8
    valid = read_classification(f"{tmp_path / 'dict'}:validation")
    assert valid.texts == [f"headline number {i}" for i in range(50, 54)]
    with pytest.raises(ValueError, match=r"holds the splits train, validation; name one: .*dict:SPLIT"):
        read_classification(tmp_path / "dict")
    with pytest.raises(ValueError, match=r"no split 'dev' \(splits: train, validation\)"):
        read_classification(f"{tmp_path / 'dict'}:dev")


def test_hub_id_resolves_offline_from_the_cache(offline_hub):
    assert len(read_classification("lmforge-tests/news:train")) == 8
    sliced = read_classification("lmforge-tests/news:test[:2]")
    assert sliced.texts == ["headline number 100", "headline number 101"]
    with pytest.raises(ValueError, match=r"lmforge-tests/nothere:train: cannot load Hub dataset 'lmforge-tests/"
                                         r"nothere' split 'train'"):
        read_classification("lmforge-tests/nothere:train")


def test_a_mistyped_file_is_not_sent_to_the_hub(tmp_path):
    assert not is_dataset_source(tmp_path / "trian.csv")
    with pytest.raises(FileNotFoundError, match="trian.csv: no such file"):
        read_classification(tmp_path / "trian.csv")


def test_missing_column_names_it_and_the_ones_there(tmp_path):
    path = tmp_path / "d.parquet"
    news().rename_column("text", "sentence").to_parquet(path)
    with pytest.raises(ValueError, match=r"d\.parquet: no column 'text' \(columns: sentence, label\); rename one "
                                         r"with --columns OLD=text"):
        read_classification(path)
    assert len(read_classification(path, columns="sentence=text")) == 8
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: sentence, label\); --columns renames "
                                         r"'sentnce' to it, which is not there either"):
        read_classification(path, columns="sentnce=text")


def test_column_mapping_and_bad_values():
    assert parse_columns("a=text, b=label") == {"a": "text", "b": "label"}
    with pytest.raises(ValueError, match="expected OLD=NEW pairs"):
        parse_columns("a:text")


def test_bad_rows_are_named_by_index(tmp_path):
    path = tmp_path / "d.parquet"
    Dataset.from_dict({"text": ["fine", "  ", "ok"], "label": ["a", "b", "a"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"d\.parquet\[1\]: empty 'text'"):
        read_classification(path)
    assert read_classification(path, skip_bad=True).skipped == 1


def test_ner_from_parquet_and_renamed_columns(tmp_path):
    path = tmp_path / "ner.parquet"
    ner_rows().to_parquet(path)
    data = read_conll(path)
    assert data.tags[0] == ["B-person", "I-person", "O", "O", "B-location"]
    assert data.label_names == ["O", "B-location", "I-location", "B-person", "I-person"]
    ner_rows().rename_columns({"tokens": "words", "ner_tags": "tags"}).save_to_disk(tmp_path / "renamed")
    assert read_conll(tmp_path / "renamed", columns="words=tokens,tags=ner_tags").tokens == data.tokens
    with pytest.raises(ValueError, match=r"no column 'tokens' \(columns: words, tags\)"):
        read_conll(tmp_path / "renamed")
    bad = Dataset.from_dict({"tokens": [["a", "b"]], "ner_tags": [["O", "X-thing"]]})
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet\[0\]: bad tag 'X-thing'"):
        read_conll(tmp_path / "bad.parquet")


def test_squad_v2_from_a_dataset(tmp_path):
    squad_rows().save_to_disk(tmp_path / "squad")
    data = read_squad(tmp_path / "squad")
    assert data.version == "2.0" and data.examples[0].answers[0].text == "Oslo"
    assert data.examples[1].is_impossible and data.examples[0].title == "Anna"
    broken = squad_rows().map(lambda r: {"answers": {"text": ["Bergen"], "answer_start": [22]}})
    broken.save_to_disk(tmp_path / "broken")
    with pytest.raises(ValueError, match=r"broken\[0\]: question id 'q1': answer 'Bergen' at 22 does not match"):
        read_squad(tmp_path / "broken")


def test_seq2seq_and_chat_from_datasets(tmp_path):
    Dataset.from_dict({"dialogue": ["A: hi\nB: hello"], "summary": ["They greet."]}).to_parquet(tmp_path / "s.parquet")
    pairs = read_seq2seq(tmp_path / "s.parquet", source_field="dialogue", target_field="summary")
    assert pairs.sources == ["A: hi\nB: hello"] and pairs.targets == ["They greet."]
    renamed = read_seq2seq(tmp_path / "s.parquet", columns="dialogue=source,summary=target")
    assert renamed.targets == ["They greet."]
    chats = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]],
                               "instruction": ["unused"]})
    chats.to_parquet(tmp_path / "c.parquet")
    assert read_chat(tmp_path / "c.parquet").conversations[0][1] == {"role": "assistant", "content": "hello"}
    alpaca = Dataset.from_dict({"instruction": ["Add 2 and 2."], "input": [""], "output": ["4"]})
    alpaca.save_to_disk(tmp_path / "alpaca")
    assert read_chat(tmp_path / "alpaca").conversations[0][0] == {"role": "user", "content": "Add 2 and 2."}
    no_reply = Dataset.from_dict({"prompt": ["hi"], "answer": ["x"]})
    no_reply.to_parquet(tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"n\.parquet\[0\]: expected 'messages'"):
        read_chat(tmp_path / "n.parquet")
    assert len(read_chat(tmp_path / "n.parquet", columns="answer=response")) == 1
