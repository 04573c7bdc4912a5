"""Making the theory visible: attention maps, next-token distributions, position encodings.

- `attention_maps` switches every attention layer to the reference path
  (softmax(QK^T / sqrt(d_k)), see nn/attention.py), which keeps the weights the fused
  kernel never materialises, and collects them: (n_layers, H, T, S). Causal models show
  a lower-triangular map (a token sees only itself and its past), bidirectional
  encoders a full one. `attention_png` draws them as a layers x heads grid,
  `attention_html` as one self-contained page with a layer/head selector.
- `next_token_table` (GPT) lists, per position, the top-k next tokens, the probability
  of the token that actually follows and the entropy of the distribution;
  `fill_mask` (Bert) the predictions at the [MASK] positions.
- `position_pictures`: the learned position table and the cosine similarity between
  positions, the sinusoidal table, or RoPE's cos table and the q.k product of a fixed
  vector pair against relative distance (the same at any absolute position).

`inspect_attention`, `inspect_next_token` and `inspect_positions` are what the CLI calls.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from lmforge.eval.report import save_figure, write_text
from lmforge.models.bert import Bert
from lmforge.models.encdec import EncoderDecoder, EncoderDecoderBase
from lmforge.models.gpt import GPT
from lmforge.models.t5 import T5
from lmforge.nn.position import (
    PaddingSkippingPositions,
    RelativePositionBias,
    RotaryPositions,
    SinusoidalPositions,
    apply_rope,
)

LN2 = math.log(2.0)

# ---------------------------------------------------------------- attention maps


def _unwrap(model: nn.Module) -> nn.Module:
    """A task head (SequenceClassifier, ...) wraps its language model as `backbone`."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, (GPT, Bert, EncoderDecoderBase)) else model


def _attention_layers(model: nn.Module, part: str | None) -> list[nn.Module]:
    if isinstance(model, (GPT, Bert)):
        if part not in (None, "self"):
            raise ValueError(f"part={part!r}: a {type(model).__name__} has only self-attention (part=None)")
        return [block.attn for block in model.blocks]
    if isinstance(model, EncoderDecoderBase):
        layers = {"encoder": [b.attn for b in model.encoder.blocks],
                  "decoder": [b.attn for b in model.decoder.blocks],
                  "cross": [b.cross for b in model.decoder.blocks]}
        if (part or "encoder") not in layers:
            raise ValueError(f"part must be 'encoder', 'decoder' or 'cross' for an encoder-decoder, got {part!r}")
        return layers[part or "encoder"]
    raise TypeError(f"expected a GPT, Bert or encoder-decoder model, got {type(model).__name__}")


@contextmanager
def reference_attention(model: nn.Module) -> Iterator[None]:
    """Run every attention layer of `model` through the explicit softmax path, which
    records its weights in `last_weights`; the switches come back (and the recorded
    weights are dropped) on exit, also after an exception."""
    layers = [m for m in model.modules() if hasattr(m, "use_reference") and hasattr(m, "last_weights")]
    saved = [m.use_reference for m in layers]
    try:
        for m in layers:
            m.use_reference, m.last_weights = True, None
        yield
    finally:
        for m, flag in zip(layers, saved):
            m.use_reference, m.last_weights = flag, None


def _one_sequence(ids: Tensor | Sequence[int], name: str) -> Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.size(0) != 1:
        raise ValueError(f"{name} must be one sequence, (T,) or (1, T), got shape {tuple(ids.shape)}")
    return ids


@torch.inference_mode()
def attention_maps(
    model: nn.Module,
    input_ids: Tensor | Sequence[int],
    attention_mask: Tensor | None = None,
    *,
    decoder_input_ids: Tensor | Sequence[int] | None = None,
    decoder_attention_mask: Tensor | None = None,
    part: str | None = None,
) -> Tensor:
    """Attention weights of every layer and head for one sequence: (n_layers, H, T, S), fp32, CPU.

    input_ids: (T,) or (1, T); attention_mask: same shape, 1 = token, 0 = padding.
    part: None for GPT/Bert (their self-attention). For an EncoderDecoder: "encoder"
        (default; S = T), "decoder" (decoder self-attention over decoder_input_ids) or
        "cross" (decoder queries over the source tokens: T = target, S = source length).
    Each row is a softmax, so it sums to 1. The model runs in eval mode (no attention
    dropout) and its training mode and attention switches are restored afterwards.
    """
    model = _unwrap(model)
    layers = _attention_layers(model, part)
    ids = _one_sequence(input_ids, "input_ids")
    device = next(model.parameters()).device
    ids = ids.to(device)
    mask = None if attention_mask is None else _one_sequence(attention_mask, "attention_mask").to(device)
    if part in ("decoder", "cross") and decoder_input_ids is None:
        raise ValueError(f"part={part!r} needs decoder_input_ids")
    was_training = model.training
    model.eval()
    try:
        with reference_attention(model):
            if isinstance(model, EncoderDecoderBase):
                memory = model.encode(ids, mask)
                if part in ("decoder", "cross"):
                    dec = _one_sequence(decoder_input_ids, "decoder_input_ids").to(device)
                    dec_mask = (None if decoder_attention_mask is None else
                                _one_sequence(decoder_attention_mask, "decoder_attention_mask").to(device))
                    model.decode(dec, memory, mask, decoder_attention_mask=dec_mask)
            else:
                model.encode(ids, mask)
            return torch.stack([m.last_weights[0].float().cpu() for m in layers])  # (L, H, T, S)
    finally:
        model.train(was_training)


def is_causal_map(maps: Tensor, atol: float = 0.0) -> bool:
    """True when every square map has nothing above its diagonal (no token sees its future)."""
    T, S = maps.shape[-2:]
    return T == S and bool((maps.triu(diagonal=1).abs() <= atol).all())


def _check_maps(maps: Tensor, tokens: Sequence[str], key_tokens: Sequence[str] | None) -> list[str]:
    if maps.dim() != 4:
        raise ValueError(f"maps must be (n_layers, H, T, S), got shape {tuple(maps.shape)}")
    keys = list(tokens if key_tokens is None else key_tokens)
    if len(tokens) != maps.size(2) or len(keys) != maps.size(3):
        raise ValueError(f"maps are {maps.size(2)} x {maps.size(3)} but there are {len(tokens)} query "
                         f"and {len(keys)} key tokens")
    return keys


def attention_png(maps: Tensor, tokens: Sequence[str], path: str | os.PathLike, *,
                  key_tokens: Sequence[str] | None = None, title: str | None = None) -> Path:
    """A layers x heads grid of heatmaps (rows: queries, columns: keys; weight 0..1).
    Token labels are drawn on the outer panels while there are at most 40 tokens."""
    keys = _check_maps(maps, tokens, key_tokens)
    L, H, T, S = maps.shape
    cell = 1.2 + 0.12 * max(T, S) if max(T, S) <= 40 else 3.0
    fig = Figure(figsize=(cell * H + 1, cell * L + 1), layout="constrained")
    axes = fig.subplots(L, H, squeeze=False)
    labels = max(T, S) <= 40
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            show_y, show_x = labels and head == 0, labels and layer == L - 1
            ax.set_yticks(range(T) if show_y else [], labels=list(tokens) if show_y else [], fontsize=6)
            ax.set_xticks(range(S) if show_x else [], labels=keys if show_x else [], fontsize=6, rotation=90)
    kind = "causal" if is_causal_map(maps) else "bidirectional" if T == S else "cross"
    fig.suptitle(f"{title or 'attention'} ({kind}; rows attend to columns)")
    return save_figure(fig, path)


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table.map {{ border-collapse: collapse; font-size: 11px; }}
table.map td.w {{ width: 18px; height: 18px; padding: 0; border: 1px solid #eee; }}
th.col {{ writing-mode: vertical-rl; transform: rotate(180deg); font-weight: normal; white-space: pre; }}
th.row {{ text-align: right; font-weight: normal; padding-right: 4px; white-space: pre; }}
#hover {{ min-height: 1.4em; font-family: monospace; }}
</style></head><body>
<h1>{title}</h1>
<p id="kind">{kind}</p>
<p>Rows are queries (the token that attends), columns are keys (the token attended to); each row
sums to 1. Darker = more weight (shade = square root of the weight, so small weights stay visible).</p>
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<p id="hover"></p>
<div id="map"></div>
<script type="application/json" id="data">{data}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
function option(sel, value, text) {{
  const o = document.createElement("option"); o.value = value; o.textContent = text; sel.appendChild(o);
}}
for (let l = 0; l < D.maps.length; l++) option(layerSel, l, String(l));
for (let h = 0; h < D.maps[0].length; h++) option(headSel, h, String(h));
option(headSel, "mean", "mean of heads");
function current() {{
  const heads = D.maps[+layerSel.value];
  if (headSel.value !== "mean") return heads[+headSel.value];
  return heads[0].map((row, i) => row.map((_, j) => heads.reduce((s, h) => s + h[i][j], 0) / heads.length));
}}
function render() {{
  const m = current(), table = document.createElement("table"), head = document.createElement("tr");
  table.className = "map";
  head.appendChild(document.createElement("th"));
  for (const k of D.keys) {{ const th = document.createElement("th"); th.className = "col"; th.textContent = k;
    head.appendChild(th); }}
  table.appendChild(head);
  m.forEach((row, i) => {{
    const tr = document.createElement("tr"), th = document.createElement("th");
    th.className = "row"; th.textContent = D.queries[i]; tr.appendChild(th);
    row.forEach((w, j) => {{
      const td = document.createElement("td"); td.className = "w";
      td.style.background = "rgba(30, 64, 175, " + Math.sqrt(w).toFixed(3) + ")";
      td.title = D.queries[i] + " \\u2192 " + D.keys[j] + ": " + w.toFixed(4);
      td.onmouseenter = () => {{ document.getElementById("hover").textContent = td.title; }};
      tr.appendChild(td);
    }});
    table.appendChild(tr);
  }});
  document.getElementById("map").replaceChildren(table);
}}
layerSel.onchange = render; headSel.onchange = render; render();
</script>
</body></html>
"""


def attention_html(maps: Tensor, tokens: Sequence[str], path: str | os.PathLike, *,
                   key_tokens: Sequence[str] | None = None, title: str = "Attention",
                   max_values: int = 4_000_000) -> Path:
    """One self-contained HTML page (no external scripts or styles) showing one layer/head
    at a time, chosen from two selectors (or the mean of the heads), tokens on both axes.
    Refuses maps of more than `max_values` weights (the page would be too big to open);
    pick fewer layers (maps[a:b]) or a shorter text."""
    keys = _check_maps(maps, tokens, key_tokens)
    if maps.numel() > max_values:
        raise ValueError(f"maps hold {maps.numel()} weights, more than max_values={max_values}; "
                         "pass fewer layers or a shorter text")
    T, S = maps.shape[-2:]
    if is_causal_map(maps):
        kind = "Causal: the upper triangle is empty, each token sees only itself and earlier tokens."
    elif T == S:
        kind = "Bidirectional: every token may attend to every other token."
    else:
        kind = "Cross-attention: target tokens (rows) attend to source tokens (columns)."
    data = {"queries": list(tokens), "keys": keys, "maps": maps.double().round(decimals=4).tolist()}
    # Inside <script>, "</script>" in a token would end the block: escape <, > and & in the JSON.
    blob = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
    blob = blob.replace("&", "\\u0026")
    return write_text(path, _HTML.format(title=html.escape(title), kind=html.escape(kind), data=blob))


# ---------------------------------------------------------------- next-token views


def _top(probs: Tensor, k: int, tokenizer) -> list[dict]:
    p, ids = probs.topk(min(k, probs.numel()))
    return [{"token": tokenizer.id_to_token(int(i)), "id": int(i), "prob": float(q)} for q, i in zip(p, ids)]


def _entropy_nats(probs: Tensor) -> Tensor:
    """-sum p ln p along the last dimension (0 ln 0 = 0)."""
    return torch.special.entr(probs).sum(-1)


@torch.inference_mode()
def next_token_table(model: nn.Module, tokenizer, text: str, k: int = 5, *,
                     add_special_tokens: bool = True) -> list[dict]:
    """What a GPT expects next, at every position of `text`.

    One dict per token: "position", "token", "id", "top" (the k likeliest next tokens,
    [{"token", "id", "prob"}]), "entropy_nats" / "entropy_bits" of the next-token
    distribution (0 = certain, log2 V bits = uniform), and, where a next token exists in
    the text, "next_token", "next_prob", "next_rank" (1 = the model's first choice) and
    "surprisal_bits" (-log2 of its probability; their mean is the text's cross-entropy).
    """
    model = _unwrap(model)
    if not isinstance(model, GPT):
        raise ValueError(f"next_token_table needs a GPT (causal) model, got {type(model).__name__}; "
                         "for a Bert model use fill_mask")
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if not ids:
        raise ValueError("text encodes to no tokens")
    if len(ids) > model.config.max_seq_len:
        raise ValueError(f"text has {len(ids)} tokens, more than max_seq_len={model.config.max_seq_len}")
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([ids], device=next(model.parameters()).device)
        probs = model(x)[0].float().softmax(-1).cpu()  # (T, V)
    finally:
        model.train(was_training)
    entropy = _entropy_nats(probs)
    rows = []
    for t, tok in enumerate(ids):
        row = {"position": t, "token": tokenizer.id_to_token(tok), "id": tok, "top": _top(probs[t], k, tokenizer),
               "entropy_nats": float(entropy[t]), "entropy_bits": float(entropy[t]) / LN2}
        if t + 1 < len(ids):
            nxt = ids[t + 1]
            p = float(probs[t, nxt])
            row.update(next_token=tokenizer.id_to_token(nxt), next_prob=p,
                       next_rank=int((probs[t] > probs[t, nxt]).sum()) + 1,
                       surprisal_bits=-math.log2(p) if p > 0 else math.inf)
        rows.append(row)
    return rows


@torch.inference_mode()
def fill_mask(model: nn.Module, tokenizer, text: str, k: int = 5) -> list[dict]:
    """A Bert's predictions at each mask token of `text` (written with tokenizer.mask_token).

    One dict per mask: "position" (index in the encoded ids, special tokens included),
    "top" ([{"token", "id", "prob"}]), "entropy_nats", "entropy_bits", and "filled"
    (the decoded text with every mask replaced by its top prediction).
    """
    model = _unwrap(model)
    if not isinstance(model, Bert):
        raise ValueError(f"fill_mask needs a Bert (masked LM) model, got {type(model).__name__}")
    ids = tokenizer.encode(text, add_special_tokens=True)
    positions = [t for t, i in enumerate(ids) if i == tokenizer.mask_id]
    if not positions:
        raise ValueError(f"text contains no {tokenizer.mask_token}: nothing to fill")
    if len(ids) > model.config.max_seq_len:
        raise ValueError(f"text has {len(ids)} tokens, more than max_seq_len={model.config.max_seq_len}")
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([ids], device=next(model.parameters()).device)
        hidden = model.encode(x)[0, positions]  # (M, D): only the masked positions reach the vocab head
        probs = model.mlm_logits(hidden).float().softmax(-1).cpu()  # (M, V)
    finally:
        model.train(was_training)
    entropy = _entropy_nats(probs)
    filled = list(ids)
    for m, t in enumerate(positions):
        filled[t] = int(probs[m].argmax())
    text_filled = tokenizer.decode(filled)
    return [{"position": t, "top": _top(probs[m], k, tokenizer), "entropy_nats": float(entropy[m]),
             "entropy_bits": float(entropy[m]) / LN2, "filled": text_filled} for m, t in enumerate(positions)]


def format_token_table(rows: list[dict]) -> str:
    """A plain-text view of next_token_table or fill_mask rows, one line per position."""
    lines = []
    for r in rows:
        top = ", ".join(f"{c['token']!r} {c['prob']:.3f}" for c in r["top"])
        here = f"{r['position']:>4} {r['token']!r:<14}" if "token" in r else f"{r['position']:>4} {'[mask]':<14}"
        nxt = (f" next {r['next_token']!r} p={r['next_prob']:.3f} rank {r['next_rank']}"
               if "next_token" in r else "")
        lines.append(f"{here} H={r['entropy_bits']:5.2f} bits | {top}{nxt}")
    return "\n".join(lines)


# ---------------------------------------------------------------- position pictures


def cosine_similarity_matrix(table: Tensor) -> Tensor:
    """(P, D) position vectors -> (P, P) cosine similarity between every pair of positions."""
    t = F.normalize(table.detach().float(), dim=-1)
    return t @ t.T


def rope_dot_by_distance(rope: RotaryPositions, q: Tensor, k: Tensor, start: int = 0,
                         max_distance: int | None = None) -> Tensor:
    """RoPE's defining property, measured: q.k after rotating k to position `start` and q
    to start + d, for d = 0..max_distance. q, k: (Dh,). Returns (max_distance + 1,).
    The result does not depend on `start`, only on the distance d."""
    n, dh = rope.cos.shape
    if q.shape != (dh,) or k.shape != (dh,):
        raise ValueError(f"q and k must be ({dh},) vectors, got {tuple(q.shape)} and {tuple(k.shape)}")
    max_distance = n - 1 - start if max_distance is None else max_distance
    if start < 0 or max_distance < 0 or start + max_distance >= n:
        raise ValueError(f"positions {start}..{start + max_distance} are outside the table of {n} positions")
    pos = torch.arange(start, start + max_distance + 1, device=rope.cos.device)
    qr = apply_rope(q.float().expand(1, 1, len(pos), dh), rope.cos[pos][None], rope.sin[pos][None])  # (1,1,N,Dh)
    kr = apply_rope(k.float().view(1, 1, 1, dh), rope.cos[start][None, None], rope.sin[start][None, None])
    return (qr[0, 0] * kr[0, 0]).sum(-1)  # (N,)


def _heatmap(matrix: Tensor, path: Path, title: str, xlabel: str, ylabel: str, *, symmetric: bool) -> Path:
    m = matrix.detach().float().cpu().numpy()
    limit = float(abs(m).max()) or 1.0
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="RdBu_r" if symmetric else "viridis",
                   vmin=-limit if symmetric else None, vmax=limit if symmetric else None)
    fig.colorbar(im, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return save_figure(fig, path)


def _table_pictures(name: str, table: Tensor, prefix: str) -> list[Path]:
    return [
        _heatmap(table, Path(f"{prefix}_{name}.png"), f"{name} position vectors", "feature", "position",
                 symmetric=True),
        _heatmap(cosine_similarity_matrix(table), Path(f"{prefix}_{name}_similarity.png"),
                 f"{name}: cosine similarity between positions", "position", "position", symmetric=True),
    ]


def _rope_pictures(rope: RotaryPositions, n: int, prefix: str) -> list[Path]:
    dh = rope.cos.size(1)
    cos_path = _heatmap(rope.cos[:n, : dh // 2], Path(f"{prefix}_rope_cos.png"),
                        "RoPE: cos(position x theta_i) per rotated feature pair", "feature pair i (fast -> slow)",
                        "position", symmetric=True)
    # q = k = ones: the curve of the RoFormer paper, sum_i 2 cos(d theta_i), decaying with distance.
    ones = torch.ones(dh, device=rope.cos.device)
    later = n // 2
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(rope_dot_by_distance(rope, ones, ones, 0, n - 1 - later).cpu().numpy(), label="k at position 0")
    ax.plot(rope_dot_by_distance(rope, ones, ones, later, n - 1 - later).cpu().numpy(), "--",
            label=f"k at position {later}")
    ax.set(title="RoPE: q.k depends only on the distance", xlabel="distance (query position - key position)",
           ylabel="q . k  (q = k = ones)")
    ax.legend()
    return [cos_path, save_figure(fig, Path(f"{prefix}_rope_distance.png"))]


def relative_bias_by_distance(bias: RelativePositionBias, n: int) -> Tensor:
    """What a relative position bias adds to the scores of each head at distances key - query
    = -n..n (a causal stack's positive distances are masked anyway): (H, 2n + 1)."""
    keys = torch.arange(2 * n + 1, device=bias.weight.device)
    return bias(keys[n:n + 1], keys)[0, :, 0].detach()  # query at n: (1, H, 1, 2n + 1) -> (H, 2n + 1)


def _relative_bias_pictures(model: T5, n: int | None, prefix: str) -> list[Path]:
    paths = []
    for side in ("encoder", "decoder"):
        bias = getattr(model, side).pos_bias
        k = n or bias.max_distance
        m = relative_bias_by_distance(bias, k).float().cpu()
        path = _heatmap(m, Path(f"{prefix}_{side}_relative_bias.png"),
                        f"{side}: relative position bias per head (columns: key - query = -{k}..{k})",
                        f"distance + {k}", "head", symmetric=True)
        paths.append(path)
    return paths


def position_pictures(model: nn.Module, path_prefix: str | os.PathLike, *,
                      max_positions: int | None = None) -> list[Path]:
    """Pictures of how `model` encodes position, written as `{path_prefix}_*.png`.

    learned (GPT-2, Bert, RoBERTa, BART encoder and decoder): the (P, D) table as a heatmap and the
        (P, P) cosine similarity between positions (trained tables show a bright band:
        nearby positions get similar vectors);
    sinusoidal: the fixed table and its similarity (a Toeplitz matrix: it depends only on
        the distance between positions);
    rope: the cos table (positions x feature pairs) and q.k against distance;
    relative bias (T5): each stack's bias per head against distance key - query (the
        decoder's is flat for keys after the query, which it never sees).
    max_positions: draw only the first positions (default: all; T5: distances up to
        relative_max_distance). Returns the paths written.
    """
    model, prefix = _unwrap(model), str(path_prefix)
    if isinstance(model, T5):
        return _relative_bias_pictures(model, max_positions, prefix)
    if isinstance(model, GPT) and model.rope is not None:
        n = min(model.rope.cos.size(0), max_positions or model.rope.cos.size(0))
        return _rope_pictures(model.rope, n, prefix)
    paths = []
    for name, table in position_tables(model).items():
        paths += _table_pictures(name, table[:max_positions].cpu(), prefix)
    return paths


def position_tables(model: nn.Module) -> dict[str, Tensor]:
    """The (P, D) vector of each position 0, 1, ... a model adds to its token embeddings, by
    name ("learned", "sinusoidal", "encoder_learned", ...); rows never used as a position are
    left out (BART's 2 reserved rows; RoBERTa's rows up to its padding id). A rotary GPT has none."""
    model = _unwrap(model)
    if isinstance(model, GPT | Bert):
        if model.pos_emb is None:
            return {}
        tables = {"sinusoidal" if isinstance(model.pos_emb, SinusoidalPositions) else "learned": model.pos_emb}
    elif isinstance(model, EncoderDecoder):
        if isinstance(model.encoder.pos_emb, SinusoidalPositions):
            tables = {"sinusoidal": model.encoder.pos_emb}  # one fixed table for both stacks
        else:
            tables = {"encoder_learned": model.encoder.pos_emb, "decoder_learned": model.decoder.pos_emb}
    else:
        raise TypeError(f"expected a GPT, Bert or EncoderDecoder model, got {type(model).__name__}")
    offset = 0
    if isinstance(model, EncoderDecoder):
        offset = model.encoder.offset  # BART's 2 reserved rows
    elif isinstance(model, Bert) and isinstance(model.pos_emb, PaddingSkippingPositions):
        offset = model.pos_emb.pad_id + 1  # RoBERTa's first real token sits at pad_id + 1
    return {name: (m.table if isinstance(m, SinusoidalPositions) else m.weight[offset:]).detach()
            for name, m in tables.items()}


# ---------------------------------------------------------------- what the CLI calls


def _labels(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.id_to_token(int(i)) for i in ids]


def _write_maps(maps: Tensor, queries: list[str], keys: list[str], stem: Path, title: str) -> list[Path]:
    return [attention_png(maps, queries, stem.with_suffix(".png"), key_tokens=keys, title=title),
            attention_html(maps, queries, stem.with_suffix(".html"), key_tokens=keys, title=title)]


def inspect_attention(model: nn.Module, tokenizer, text: str, out_dir: str | os.PathLike, *,
                      target: str | None = None, add_special_tokens: bool = True) -> list[Path]:
    """Attention maps of `text` as out_dir/attention.{png,html} (GPT, Bert). For an
    EncoderDecoder: attention_encoder.*, and with a `target` text also the decoder's
    self-attention (attention_decoder.*) and cross-attention (attention_cross.*), the
    decoder reading the target shifted right as in training. Returns the paths written."""
    model, out = _unwrap(model), Path(out_dir)
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if not ids:
        raise ValueError("text encodes to no tokens")
    toks = _labels(tokenizer, ids)
    if not isinstance(model, EncoderDecoderBase):
        return _write_maps(attention_maps(model, ids), toks, toks, out / "attention",
                           f"{type(model).__name__} self-attention")
    paths = _write_maps(attention_maps(model, ids), toks, toks, out / "attention_encoder", "encoder self-attention")
    if target is not None:
        labels = tokenizer.encode(target, add_special_tokens=add_special_tokens)
        if not labels:
            raise ValueError("target encodes to no tokens")
        dec = model.shift_right(torch.tensor([labels]))[0].tolist()
        dtoks = _labels(tokenizer, dec)
        paths += _write_maps(attention_maps(model, ids, decoder_input_ids=dec, part="decoder"), dtoks, dtoks,
                             out / "attention_decoder", "decoder self-attention")
        paths += _write_maps(attention_maps(model, ids, decoder_input_ids=dec, part="cross"), dtoks, toks,
                             out / "attention_cross", "decoder cross-attention")
    return paths


def inspect_next_token(model: nn.Module, tokenizer, text: str, k: int = 5) -> tuple[list[dict], str]:
    """GPT: next_token_table; Bert: fill_mask (the text must contain mask tokens).
    Returns (rows, the same as printable text)."""
    model = _unwrap(model)
    if isinstance(model, GPT):
        rows = next_token_table(model, tokenizer, text, k)
    elif isinstance(model, Bert):
        rows = fill_mask(model, tokenizer, text, k)
    else:
        raise ValueError(f"next-token inspection needs a GPT or a Bert model, got {type(model).__name__}")
    return rows, format_token_table(rows)


def inspect_positions(model: nn.Module, out_dir: str | os.PathLike, *,
                      max_positions: int | None = None) -> list[Path]:
    """position_pictures into out_dir/positions_*.png."""
    return position_pictures(model, Path(out_dir) / "positions", max_positions=max_positions)
