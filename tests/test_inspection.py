import json
import math
import re
import shutil
import subprocess

import pytest
import torch
from matplotlib.image import imread
from torch.testing import assert_close

from lmforge.inspection import (
    attention_html,
    attention_maps,
    attention_png,
    cosine_similarity_matrix,
    fill_mask,
    format_token_table,
    inspect_attention,
    inspect_next_token,
    inspect_positions,
    is_causal_map,
    next_token_table,
    position_pictures,
    rope_dot_by_distance,
)
from lmforge.models import GPT, T5, Bert, BertConfig, EncoderDecoder, EncoderDecoderConfig, GPTConfig, T5Config
from lmforge.nn.position import RotaryPositions, relative_position_bucket, sinusoidal_table

V = 40


class WordTokenizer:
    """Stand-in for lmforge.Tokenizer: whitespace words, [CLS] ... [SEP] around a text."""

    def __init__(self, size: int = V) -> None:
        self.vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(size - 5)]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.mask_id, self.mask_token = 4, "[MASK]"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.index.get(w, 1) for w in text.split()]
        return [2, *ids, 3] if add_special_tokens else ids

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids if i not in (0, 2, 3))

    def id_to_token(self, i: int) -> str:
        return self.vocab[i]


def gpt(**kw) -> GPT:
    cfg = dict(vocab_size=V, max_seq_len=16, dim=32, n_layers=2, n_heads=4, vocab_multiple=8)
    m = GPT(GPTConfig(**{**cfg, **kw}))
    m.init_weights(std=0.3)  # peaked attention, so a wrong map cannot pass by being near-uniform
    return m.eval()


def bert() -> Bert:
    m = Bert(BertConfig(vocab_size=V, max_seq_len=16, dim=32, n_layers=2, n_heads=4, vocab_multiple=8))
    m.init_weights(std=0.3)
    return m.eval()


def encdec(**kw) -> EncoderDecoder:
    return EncoderDecoder(EncoderDecoderConfig(vocab_size=V, max_seq_len=16, dim=32, n_layers=2, n_heads=4,
                                               dropout=0.0, vocab_multiple=8, **kw)).eval()


def t5(**kw) -> T5:
    return T5(T5Config(vocab_size=V, max_seq_len=16, dim=32, n_layers=2, n_heads=4, head_dim=8, hidden_dim=64,
                       relative_buckets=8, relative_max_distance=12, dropout=0.0, vocab_multiple=8, **kw)).eval()


def hand_attention(q, k, allowed):
    """softmax(QK^T / sqrt(d_k)) with disallowed scores at -inf; q, k: (H, T, Dh)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def split_heads(t, n):
    return t.view(t.size(0), n, -1).transpose(0, 1)  # (T, n*Dh) -> (n, T, Dh)


# ---------------------------------------------------------------- attention maps


def test_gpt_layer0_equals_hand_computation_and_is_causal():
    m = gpt()
    ids = torch.randint(0, V, (7,))
    maps = attention_maps(m, ids)
    assert maps.shape == (2, 4, 7, 7)
    with torch.no_grad():
        x = m.tok_emb(ids) + m.pos_emb(torch.arange(7))  # (T, D): the first block's input
        q, k, _ = m.blocks[0].attn.wqkv(m.blocks[0].attn_norm(x)).split(32, dim=-1)
        expected = hand_attention(split_heads(q, 4), split_heads(k, 4), torch.ones(7, 7, dtype=torch.bool).tril())
    assert_close(maps[0], expected)
    assert_close(maps.sum(-1), torch.ones(2, 4, 7))
    assert is_causal_map(maps) and maps.triu(1).abs().max() == 0
    assert maps[0, :, 1:, 0].min() < 0.99  # not a trivial map: later tokens spread their weight


def test_rope_gqa_layer0_equals_hand_computation():
    m = gpt(positions="rope", n_kv_heads=2, norm="rmsnorm", mlp="swiglu", bias=False)
    ids = torch.randint(0, V, (9,))
    maps = attention_maps(m, ids)
    Dh, T = 8, 9
    with torch.no_grad():
        x = m.tok_emb(ids)
        q, k, _ = m.blocks[0].attn.wqkv(m.blocks[0].attn_norm(x)).split([32, 16, 16], dim=-1)
        q, k = split_heads(q, 4), split_heads(k, 2)
        inv_freq = 10000.0 ** (-torch.arange(0, Dh, 2).float() / Dh)
        ang = torch.outer(torch.arange(T).float(), inv_freq).repeat(1, 2)  # (T, Dh)

        def rot(t):  # feature i pairs with i + Dh/2
            return t * ang.cos() + torch.cat([-t[..., Dh // 2:], t[..., : Dh // 2]], -1) * ang.sin()

        k = rot(k).repeat_interleave(2, dim=0)  # query heads 0,1 share kv head 0; 2,3 share kv head 1
        expected = hand_attention(rot(q), k, torch.ones(T, T, dtype=torch.bool).tril())
    assert_close(maps[0], expected)


def test_bert_layer0_with_padding_equals_hand_computation_and_is_bidirectional():
    m = bert()
    ids = torch.randint(5, V, (7,))
    pad = torch.tensor([1, 1, 1, 1, 1, 0, 0])
    maps = attention_maps(m, ids, pad)
    with torch.no_grad():
        x = m.emb_norm(m.tok_emb(ids) + m.pos_emb(torch.arange(7)) + m.type_emb(torch.zeros(7, dtype=torch.long)))
        q, k, _ = m.blocks[0].attn.wqkv(x).split(32, dim=-1)  # post-LN: attention reads x directly
        allowed = pad.bool()[None, :] | torch.eye(7, dtype=torch.bool)  # padding hidden, except from itself
        expected = hand_attention(split_heads(q, 4), split_heads(k, 4), allowed)
    assert_close(maps[0], expected)
    assert maps[:, :, :5, 5:].abs().max() == 0  # real tokens never see padding
    assert not is_causal_map(maps) and maps[:, :, :5].triu(1).sum() > 0.5  # tokens look ahead
    assert_close(maps.sum(-1), torch.ones(2, 4, 7))


def test_encdec_encoder_decoder_and_cross_maps():
    m = encdec()
    src, src_mask = torch.randint(3, V, (6,)), torch.tensor([1, 1, 1, 1, 0, 0])
    dec = torch.randint(3, V, (5,))
    enc = attention_maps(m, src, src_mask)
    self_maps = attention_maps(m, src, src_mask, decoder_input_ids=dec, part="decoder")
    cross = attention_maps(m, src, src_mask, decoder_input_ids=dec, part="cross")
    assert enc.shape == (2, 4, 6, 6) and self_maps.shape == (2, 4, 5, 5) and cross.shape == (2, 4, 5, 6)
    assert not is_causal_map(enc) and is_causal_map(self_maps)
    assert cross[..., 4:].abs().max() == 0  # padded source positions get no weight
    for maps in (enc, self_maps, cross):
        assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))
    with pytest.raises(ValueError, match="needs decoder_input_ids"):
        attention_maps(m, src, part="cross")
    with pytest.raises(ValueError, match="only self-attention"):
        attention_maps(gpt(), src, part="cross")


def test_t5_maps_equal_hand_computation_with_the_position_bias():
    """T5's encoder layer 0 by hand: softmax(Q K^T + bias[bucket(key - query)]), no 1/sqrt(d_k);
    the decoder's maps are causal, the cross maps skip padded sources."""
    m = t5()
    src, src_mask = torch.randint(3, V, (6,)), torch.tensor([1, 1, 1, 1, 0, 0])
    dec = torch.randint(3, V, (5,))
    enc = attention_maps(m, src, src_mask)
    x = m.encoder.blocks[0].attn_norm(m.tok_emb(src))
    q, k, _ = split_heads(m.encoder.blocks[0].attn.wqkv(x), 12).split(4)  # (H, T, Dh) each
    rel = torch.arange(6)[None] - torch.arange(6)[:, None]
    bias = m.encoder.pos_bias.weight[relative_position_bucket(rel, True, 8, 12)].permute(2, 0, 1)  # (H, T, S)
    allowed = src_mask.bool()[None, None].expand(1, 6, 6) | torch.eye(6, dtype=torch.bool)
    want = (q @ k.transpose(-2, -1) + bias).masked_fill(~allowed, float("-inf")).softmax(-1)
    with torch.no_grad():
        assert_close(enc[0], want, atol=1e-5, rtol=1e-5)
    self_maps = attention_maps(m, src, src_mask, decoder_input_ids=dec, part="decoder")
    cross = attention_maps(m, src, src_mask, decoder_input_ids=dec, part="cross")
    assert is_causal_map(self_maps) and not is_causal_map(enc)
    assert cross.shape == (2, 4, 5, 6) and cross[..., 4:].abs().max() == 0


def test_t5_relative_bias_pictures(tmp_path):
    paths = position_pictures(t5(), tmp_path / "pos")
    assert [p.name for p in paths] == ["pos_encoder_relative_bias.png", "pos_decoder_relative_bias.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    paths = inspect_attention(t5(), WordTokenizer(), "w1 w2 w3", tmp_path / "a", target="w4 w5")
    assert len(paths) == 6


def test_switches_and_training_mode_restored_also_on_error():
    m = gpt(dropout=0.3)
    m.blocks[1].attn.use_reference = True  # a switch someone set on purpose stays set
    m.train()
    a = attention_maps(m, torch.arange(6))
    b = attention_maps(m, torch.arange(6))
    assert torch.equal(a, b)  # eval mode inside: no dropout
    assert m.training
    assert [blk.attn.use_reference for blk in m.blocks] == [False, True]
    assert all(blk.attn.last_weights is None for blk in m.blocks)
    with pytest.raises(ValueError, match="max_seq_len"):
        attention_maps(m, torch.arange(20) % V)
    assert [blk.attn.use_reference for blk in m.blocks] == [False, True] and m.training
    with pytest.raises(ValueError, match="one sequence"):
        attention_maps(m, torch.zeros(2, 5, dtype=torch.long))


def test_attention_png_and_html(tmp_path):
    tokens = ["a", "</script><b>x&y", "c", "d"]
    maps = attention_maps(gpt(), torch.tensor([5, 6, 7, 8]))
    png = attention_png(maps, tokens, tmp_path / "attn.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and imread(png).shape[0] > 100
    page = attention_html(maps, tokens, tmp_path / "attn.html", title="GPT <test>").read_text()
    assert page.count("</script>") == 2  # the token cannot close the data block
    assert not re.search(r"\b(src|href)\s*=|https?://|@import", page)  # self-contained
    assert "Causal" in page and "GPT &lt;test&gt;" in page
    assert '<select id="layer">' in page and '<select id="head">' in page
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    data = json.loads(blob)
    assert data["queries"] == tokens == data["keys"]
    assert_close(torch.tensor(data["maps"]), maps, atol=6e-5, rtol=0)
    bidir = attention_html(attention_maps(bert(), torch.tensor([5, 6, 7, 8])), tokens, tmp_path / "b.html")
    assert "Bidirectional" in bidir.read_text()
    with pytest.raises(ValueError, match="max_values"):
        attention_html(maps, tokens, tmp_path / "big.html", max_values=10)
    with pytest.raises(ValueError, match="3 query and 3 key tokens"):
        attention_png(maps, tokens[:3], tmp_path / "bad.png")


# ---------------------------------------------------------------- next-token views


def test_next_token_table_matches_the_model():
    m, tok = gpt(), WordTokenizer()
    text = "w1 w2 w3 w4"
    rows = next_token_table(m, tok, text, k=3)
    ids = tok.encode(text)
    probs = m(torch.tensor([ids]))[0].softmax(-1)
    assert [r["token"] for r in rows] == ["[CLS]", "w1", "w2", "w3", "w4", "[SEP]"]
    for t, r in enumerate(rows):
        p, top = probs[t].topk(3)
        assert [c["id"] for c in r["top"]] == top.tolist()
        assert [c["prob"] for c in r["top"]] == pytest.approx(p.tolist(), rel=1e-5)
        assert r["entropy_nats"] == pytest.approx(-(probs[t] * probs[t].log()).sum().item(), rel=1e-5)
        assert r["entropy_bits"] == pytest.approx(r["entropy_nats"] / math.log(2))
        if t + 1 < len(ids):
            assert r["next_prob"] == pytest.approx(probs[t, ids[t + 1]].item(), rel=1e-5)
            assert r["next_rank"] == int((probs[t].argsort(descending=True) == ids[t + 1]).nonzero()) + 1
            assert r["surprisal_bits"] == pytest.approx(-math.log2(r["next_prob"]))
    assert "next_token" not in rows[-1]
    text_view = format_token_table(rows)
    assert len(text_view.splitlines()) == len(rows) and "'w1'" in text_view


def test_next_token_uniform_model_has_maximal_entropy():
    m = gpt(tie_embeddings=False)
    with torch.no_grad():
        m.lm_head.weight.zero_()  # every logit 0: the uniform distribution
    rows = next_token_table(m, WordTokenizer(), "w1 w2", k=2)
    for r in rows:
        assert r["entropy_bits"] == pytest.approx(math.log2(V))
        assert r["top"][0]["prob"] == pytest.approx(1 / V)
    assert rows[0]["next_rank"] == 1 and rows[0]["surprisal_bits"] == pytest.approx(math.log2(V))
    with pytest.raises(ValueError, match="needs a GPT"):
        next_token_table(bert(), WordTokenizer(), "w1")


def test_fill_mask_predicts_at_mask_positions():
    m, tok = bert(), WordTokenizer()
    rows = fill_mask(m, tok, "w7 [MASK] w9 [MASK]", k=4)
    ids = tok.encode("w7 [MASK] w9 [MASK]")
    probs = m(torch.tensor([ids]))[0].softmax(-1)
    assert [r["position"] for r in rows] == [2, 4]
    for r in rows:
        p, top = probs[r["position"]].topk(4)
        assert [c["id"] for c in r["top"]] == top.tolist()
        assert [c["prob"] for c in r["top"]] == pytest.approx(p.tolist(), rel=1e-5)
    best = [tok.vocab[int(probs[t].argmax())] for t in (2, 4)]
    assert rows[0]["filled"] == f"w7 {best[0]} w9 {best[1]}"
    with pytest.raises(ValueError, match=r"no \[MASK\]"):
        fill_mask(m, tok, "w7 w8")
    rows2, text = inspect_next_token(m, tok, "w7 [MASK]")
    assert rows2[0]["position"] == 2 and "[mask]" in text


# ---------------------------------------------------------------- positions


def test_sinusoidal_similarity_depends_only_on_distance():
    sim = cosine_similarity_matrix(sinusoidal_table(48, 32))
    assert_close(sim.diagonal(), torch.ones(48))
    assert_close(sim[1:, 1:], sim[:-1, :-1], atol=1e-5, rtol=0)  # Toeplitz


def test_rope_dot_depends_only_on_distance():
    rope = RotaryPositions(64, 16)
    q, k = torch.randn(16), torch.randn(16)
    at0 = rope_dot_by_distance(rope, q, k, start=0, max_distance=20)
    at30 = rope_dot_by_distance(rope, q, k, start=30, max_distance=20)
    assert_close(at0, at30, atol=1e-4, rtol=1e-4)
    assert at0[0] == pytest.approx(float(q @ k), rel=1e-5)
    assert at0.std() > 0.1  # it does depend on the distance
    with pytest.raises(ValueError, match="outside the table"):
        rope_dot_by_distance(rope, q, k, start=50, max_distance=20)


@pytest.mark.parametrize("make,names", [
    (lambda: gpt(), ["learned", "learned_similarity"]),
    (lambda: gpt(positions="sinusoidal"), ["sinusoidal", "sinusoidal_similarity"]),
    (lambda: gpt(positions="rope"), ["rope_cos", "rope_distance"]),
    (bert, ["learned", "learned_similarity"]),
    (lambda: encdec(position_offset=2), ["encoder_learned", "encoder_learned_similarity", "decoder_learned",
                                          "decoder_learned_similarity"]),
])
def test_position_pictures_written(tmp_path, make, names):
    paths = position_pictures(make(), tmp_path / "pos")
    assert [p.name for p in paths] == [f"pos_{n}.png" for n in names]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_inspect_attention_and_positions_write_files(tmp_path):
    tok = WordTokenizer()
    paths = inspect_attention(gpt(), tok, "w1 w2 w3", tmp_path / "g")
    assert sorted(p.name for p in paths) == ["attention.html", "attention.png"]
    paths = inspect_attention(encdec(), tok, "w1 w2 w3", tmp_path / "e", target="w4 w5")
    assert sorted(p.name for p in paths) == sorted(f"attention_{part}.{ext}" for part in ("encoder", "decoder", "cross")
                                                   for ext in ("png", "html"))
    cross = json.loads(re.search(r'id="data">(.*?)</script>', (tmp_path / "e" / "attention_cross.html").read_text(),
                                 re.S).group(1))
    assert cross["keys"] == ["[CLS]", "w1", "w2", "w3", "[SEP]"]
    assert cross["queries"][1:] == ["[CLS]", "w4", "w5"]  # the target shifted right behind the start token
    assert [p.name for p in inspect_positions(gpt(), tmp_path / "p")] == ["positions_learned.png",
                                                                          "positions_learned_similarity.png"]


FAKE_DOM = """
class El {
  constructor(tag) { this.tagName = tag; this.children = []; this.style = {}; this.textContent = ""; this.value = ""; }
  appendChild(c) { if (this.tagName === "select" && this.children.length === 0) this.value = String(c.value);
                   this.children.push(c); return c; }
  replaceChildren(...c) { this.children = c; }
}
const els = {data: new El("script"), layer: new El("select"), head: new El("select"), hover: new El("p"),
             map: new El("div")};
els.data.textContent = require("fs").readFileSync(process.argv[2], "utf8");
global.document = {getElementById: (id) => els[id], createElement: (tag) => new El(tag)};
eval(require("fs").readFileSync(process.argv[3], "utf8"));
const cell = () => els.map.children[0].children[3].children[2];  // query 2, key 1
const out = {rows: els.map.children[0].children.length, cols: els.map.children[0].children[1].children.length,
             layers: els.layer.children.length, heads: els.head.children.map((o) => String(o.value)),
             first: cell().style.background};
els.layer.value = "1"; els.head.value = "mean"; els.layer.onchange();
out.mean = cell().style.background;
els.head.value = "2"; els.head.onchange();
out.head2 = cell().style.background;
cell().onmouseenter(); out.hover = els.hover.textContent;
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_attention_html_script_renders_selected_head(tmp_path):
    tokens = ["a", "b", "c", "d", "e"]
    maps = attention_maps(gpt(), torch.tensor([5, 6, 7, 8, 9]))
    page = attention_html(maps, tokens, tmp_path / "a.html").read_text()
    data, script = re.findall(r"<script[^>]*>(.*?)</script>", page, re.S)
    (tmp_path / "data.json").write_text(data)
    (tmp_path / "page.js").write_text(script)
    (tmp_path / "dom.js").write_text(FAKE_DOM)
    run = subprocess.run(["node", tmp_path / "dom.js", tmp_path / "data.json", tmp_path / "page.js"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert (out["rows"], out["cols"], out["layers"]) == (6, 6, 2)  # header row/column + 5 tokens
    assert out["heads"] == ["0", "1", "2", "3", "mean"]

    w = json.loads(data)["maps"]  # the page's weights (rounded to 4 decimals), [layer][head][query][key]

    def alpha(x: float) -> str:
        return f"rgba(30, 64, 175, {math.sqrt(x):.3f})"

    assert out["first"] == alpha(w[0][0][2][1])
    assert out["mean"] == alpha(sum(w[1][h][2][1] for h in range(4)) / 4)
    assert out["head2"] == alpha(w[1][2][2][1])
    assert out["hover"] == f"c \u2192 b: {w[1][2][2][1]:.4f}"
