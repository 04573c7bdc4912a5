"""Shared by every test: one torch thread per xdist worker, a fixed seed, the shared datasets;
the tiny models, in-memory batches and run configs of the training tests (tests/train/)
and the CUDA tests (tests/cuda/); tiny RoBERTa and DistilBERT directories as transformers
writes them."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from lmforge.config import RunConfig, load_config
from lmforge.models import BertConfig, EncoderDecoderConfig, GPTConfig, build

# Two xdist workers share the CI machine's two cores: one thread each.
torch.set_num_threads(int(os.environ.get("LMFORGE_TEST_THREADS", "1")))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
V = 64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """The small real datasets that live beside the repository (not shipped)."""
    if not SHARED_DATA.exists():
        pytest.skip("shared datasets not available")
    return SHARED_DATA


class ListBatches:
    """The loop's BatchIterator protocol over a fixed list of batches, cycled forever (or
    once with cycle=False); the position is the whole state."""

    def __init__(self, batches: list[dict], cycle: bool = True) -> None:
        self.batches, self.cycle, self.pos = batches, cycle, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.cycle and self.pos >= len(self.batches):
            raise StopIteration
        batch = self.batches[self.pos % len(self.batches)]
        self.pos += 1
        return batch

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def clm_batch(batch_size: int, seq_len: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, V, (batch_size, seq_len + 1), generator=g)
    return {"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}


@pytest.fixture
def batches_cls():
    """The ListBatches class (test modules cannot import conftest under importlib mode)."""
    return ListBatches


@pytest.fixture
def make_clm_batch():
    return clm_batch


@pytest.fixture
def clm_interrupted_at():
    """clm(n): the causal LM objective, sending this process SIGINT (like Ctrl-C) during its
    n-th call."""
    from lmforge.train.objectives import clm

    def make(n: int):
        calls = {"n": 0}

        def objective(model, batch):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGINT)
            return clm(model, batch)
        return objective
    return make


@pytest.fixture
def gpt():
    def make(**kw):
        torch.manual_seed(kw.pop("seed", 0))
        return build(GPTConfig(**{"vocab_size": V, "max_seq_len": 32, "dim": 32, "n_layers": 2, "n_heads": 2, **kw}))
    return make


@pytest.fixture
def bert():
    def make(**kw):
        torch.manual_seed(kw.pop("seed", 0))
        return build(BertConfig(**{"vocab_size": V, "max_seq_len": 32, "dim": 32, "n_layers": 2, "n_heads": 2,
                                   "dropout": 0.0, "attn_dropout": 0.0, **kw}))
    return make


@pytest.fixture
def encdec():
    def make(**kw):
        torch.manual_seed(kw.pop("seed", 0))
        return build(EncoderDecoderConfig(**{"vocab_size": V, "max_seq_len": 32, "dim": 32, "n_layers": 2,
                                             "n_heads": 2, "dropout": 0.0, "pad_token_id": 0,
                                             "decoder_start_token_id": 2, **kw}))
    return make


ENCODER_SPECIALS = {"roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                    "distilbert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}


def _hf_encoder_dir(path: Path, family: str, texts: list[str], max_seq_len: int = 128) -> Path:
    """A tiny random-init RobertaForMaskedLM / DistilBertForMaskedLM and its tokenizer, as
    transformers' save_pretrained writes them."""
    hf = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    torch.manual_seed(0)
    if family == "roberta":
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=ENCODER_SPECIALS[family],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        model = json.loads(bpe.to_str())["model"]
        tok = hf.RobertaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
        config = hf.RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=max_seq_len + 2, type_vocab_size=1,
                                  layer_norm_eps=1e-5, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id)
        net = hf.RobertaForMaskedLM(config)
    else:
        wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        wp.train_from_iterator([t.lower() for t in texts], trainers.WordPieceTrainer(
            vocab_size=800, special_tokens=ENCODER_SPECIALS[family]))
        tok = hf.DistilBertTokenizer(vocab=wp.get_vocab())
        config = hf.DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=max_seq_len, pad_token_id=tok.pad_token_id)
        net = hf.DistilBertForMaskedLM(config)
    net.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def hf_encoder_dir():
    """hf_encoder_dir(path, "roberta" | "distilbert", texts) -> a tiny random-init
    RobertaForMaskedLM / DistilBertForMaskedLM directory with a tokenizer trained on `texts`,
    as transformers' save_pretrained writes them."""
    return _hf_encoder_dir


@pytest.fixture
def run_config(tmp_path):
    """A RunConfig for fast CPU tests, writing under tmp_path; keyword = dotted override."""
    def make(**overrides) -> RunConfig:
        base = {"train.out_dir": str(tmp_path / "run"), "train.device": "cpu", "train.precision": "fp32",
                "train.max_steps": 10, "train.micro_batch_size": 4, "optim.warmup_steps": 0,
                "optim.lr": 1e-3, "log.every": 1, "log.progress": False, "log.tensorboard": False,
                "log.plot": False, "log.peak_flops": 1e12, "eval.every": 0, "checkpoint.every": 0,
                "data.seq_len": 16, "train.resume": "none"}
        return load_config(None, {**base, **{k.replace("__", "."): v for k, v in overrides.items()}})
    return make


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """hub_cache("owner/name", {split: datasets.Dataset}) lays the splits out as `datasets`
    caches a Hub dataset (a packaged Parquet builder prepares them under the dataset's name, in
    the folder `datasets` names after a namespaced repository, owner___name) and makes
    `datasets` offline with that cache, so load_dataset("owner/name", split=...) resolves here."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def make(repo_id: str, splits: dict) -> Path:
        owner, name = repo_id.split("/")
        files = {}
        for split, ds in splits.items():
            files[split] = str(tmp_path / f"{name}-{split}.parquet")
            ds.to_parquet(files[split])
        Parquet(cache_dir=str(cache), dataset_name=name, hash="0", config_id="default",
                data_files=files).download_and_prepare()
        os.rename(cache / name, cache / f"{owner}___{name}")
        return cache
    return make
