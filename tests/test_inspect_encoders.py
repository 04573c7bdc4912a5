"""`lmforge inspect` and `lmforge plan` on a RoBERTa and a DistilBERT that transformers saved:
masked-token predictions equal transformers' at the <mask> / [MASK] positions, the position
pictures show the rows that are positions (RoBERTa's start after its padding id), the
planner counts transformers' parameters."""

import json
from importlib import resources

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.inspection import fill_mask, position_tables

hf = pytest.importorskip("transformers")
hf.logging.set_verbosity_error()
TEXTS = [line for line in (resources.files("lmforge") / "corpus" / "tinyshakespeare.txt").read_text(
    encoding="utf-8").splitlines() if line.strip()][:800]


def run(capsys, *argv):
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_inspect_and_plan(family, hf_encoder_dir, tmp_path, capsys):
    path = hf_encoder_dir(tmp_path / "m", family, TEXTS, max_seq_len=64)
    lm = lmforge.load(path)
    mask = lm.tokenizer.mask_token
    text = f"Good night, good {mask}! Parting is such {mask} sorrow."
    code, out, err = run(capsys, "inspect", "next-token", "--model", str(path), "--text", text, "--json",
                         "--device", "cpu")
    assert code == 0, err
    rows = json.loads(out)
    theirs = hf.AutoModelForMaskedLM.from_pretrained(path).eval()
    enc = hf.AutoTokenizer.from_pretrained(path)(text, return_tensors="pt")
    with torch.no_grad():
        probs = theirs(**enc).logits[0].softmax(-1)
    positions = (enc["input_ids"][0] == lm.tokenizer.mask_id).nonzero().flatten().tolist()
    assert [r["position"] for r in rows] == positions and len(positions) == 2
    for r in rows:
        p, top = probs[r["position"]].topk(5)
        assert [c["id"] for c in r["top"]] == top.tolist()
        assert [c["prob"] for c in r["top"]] == pytest.approx(p.tolist(), rel=1e-4)
    assert fill_mask(lm.model, lm.tokenizer, text)[0]["position"] == positions[0]

    tables = position_tables(lm.model)
    assert list(tables) == ["learned"] and tables["learned"].shape == (64, 32)
    want = theirs.base_model.embeddings.position_embeddings.weight
    assert torch.equal(tables["learned"], want[2:] if family == "roberta" else want)
    code, out, err = run(capsys, "inspect", "positions", "--model", str(path), "--out", str(tmp_path / "pos"),
                         "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pos").iterdir()) == ["positions_learned.png",
                                                                     "positions_learned_similarity.png"]
    code, out, err = run(capsys, "inspect", "attention", "--model", str(path), "--text", "To be, or not to be",
                         "--out", str(tmp_path / "att"), "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "att" / "attention.html").is_file()

    code, out, err = run(capsys, "plan", "--model", str(path), "--seq-len", "64", "--batch-size", "2", "--json")
    assert code == 0, err
    extra = 32 * 32 + 32 if family == "roberta" else 0  # RobertaModel's pooler, beside the MLM class's tensors
    padding = (-lm.config.vocab_size % 128) * (32 + 1)  # embedding rows and MLM biases up to a multiple of 128
    assert json.loads(out)["params"]["total"] == theirs.num_parameters() + extra + padding


def test_sinusoidal_positions_are_pictured_as_their_table():
    from lmforge.models import build, preset
    from lmforge.nn.position import sinusoidal_table

    model = build(preset("bert-tiny", vocab_size=100, dim=32, n_heads=4, max_seq_len=40, type_vocab_size=0,
                         pooler=False, nsp=False, positions="sinusoidal"))
    assert torch.equal(position_tables(model)["sinusoidal"], sinusoidal_table(40, 32))
