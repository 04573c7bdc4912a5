"""Task heads for fine-tuning, each wrapping a backbone (Bert or GPT) by composition.

- SequenceClassifier: one label (or several) per sequence, from a pooled vector (through
  a hidden layer first, for the heads of RoBERTa and DistilBERT);
- TokenClassifier: one label per token (NER);
- SpanExtractor: start/end logits per token (extractive QA).
The final linear layer of every head is called `head`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

POOLINGS = ("pooler", "cls", "last", "mean")
# The hidden layers a sequence classifier may put between its pooled vector and its output
# layer, by name: (activation, whether its input is dropped out too).
HIDDEN_LAYERS = {
    "tanh": ("tanh", True),    # RoBERTa's classification head: dropout, dense, tanh (then dropout, out)
    "relu": ("relu", False),   # DistilBERT's pre_classifier: dense, ReLU (then dropout, classifier)
}


def _encode(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
            token_type_ids: Tensor | None) -> Tensor:
    """Hidden states (B, T, D); segment ids go only to backbones that have segments."""
    if token_type_ids is not None and hasattr(backbone, "type_emb"):  # a Bert (it skips them without segments)
        return backbone.encode(input_ids, attention_mask, token_type_ids)
    return backbone.encode(input_ids, attention_mask)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B, T) padding mask -> (B,) index of each row's last real token (left or right padding)."""
    T = attention_mask.size(1)
    return T - 1 - attention_mask.flip(1).long().argmax(dim=1)


def _init_linear(layer: nn.Linear) -> None:
    nn.init.normal_(layer.weight, 0.0, 0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class HiddenLayer(nn.Module):
    """A classifier's hidden layer (HIDDEN_LAYERS): [dropout ->] dense -> activation, (B, D) -> (B, D)."""

    def __init__(self, dim: int, kind: str, dropout: float = 0.1) -> None:
        super().__init__()
        if kind not in HIDDEN_LAYERS:
            raise ValueError(f"hidden layer must be one of {tuple(HIDDEN_LAYERS)}, got {kind!r}")
        act, drops_input = HIDDEN_LAYERS[kind]
        self.dropout = nn.Dropout(dropout if drops_input else 0.0)
        self.dense = nn.Linear(dim, dim)
        self.act = nn.Tanh() if act == "tanh" else nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(self.dropout(x)))


class SequenceClassifier(nn.Module):
    """backbone -> pooled vector [-> hidden layer] -> dropout -> linear: (B, T) -> logits (B, n_labels).

    pooling: "pooler" (BERT's tanh pooler over [CLS]), "cls" (the first token's hidden
    state), "last" (the last real token: a causal model has read the whole sequence
    only there), "mean" (average over real tokens).
    hidden: None, or a hidden layer of the head's own (HIDDEN_LAYERS: "tanh" on <s> is
    RoBERTa's classification head, "relu" on [CLS] DistilBERT's).
    """

    def __init__(self, backbone: nn.Module, n_labels: int, pooling: str = "pooler", dropout: float = 0.1,
                 bias: bool = True, hidden: str | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "pooler" and getattr(backbone, "pooler", None) is None:
            raise ValueError(f"pooling='pooler' needs a backbone with a pooler; this {type(backbone).__name__} "
                             "has none")
        self.backbone, self.pooling = backbone, pooling
        self.hidden = HiddenLayer(backbone.config.dim, hidden, dropout) if hidden is not None else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.dim, n_labels, bias=bias)
        self.init_weights()

    def init_weights(self) -> None:
        """The head (and its hidden layer): N(0, 0.02) weights, zero biases (the backbone
        initialises itself)."""
        _init_linear(self.head)
        if self.hidden is not None:
            _init_linear(self.hidden.dense)

    def pool(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, T, D) -> (B, D)."""
        if self.pooling == "pooler":
            return self.backbone.pool(hidden)
        if self.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden[:, -1] if self.pooling == "last" else hidden.mean(dim=1)
        if self.pooling == "last":
            rows = torch.arange(hidden.size(0), device=hidden.device)
            return hidden[rows, last_token_index(attention_mask)]
        m = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        pooled = self.pool(_encode(self.backbone, input_ids, attention_mask, token_type_ids), attention_mask)
        if self.hidden is not None:
            pooled = self.hidden(pooled)  # (B, D)
        return self.head(self.dropout(pooled))


class TokenClassifier(nn.Module):
    """backbone -> dropout -> linear at every position: (B, T) -> logits (B, T, n_labels)."""

    def __init__(self, backbone: nn.Module, n_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.dim, n_labels)
        self.init_weights()

    def init_weights(self) -> None:
        _init_linear(self.head)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        return self.head(self.dropout(_encode(self.backbone, input_ids, attention_mask, token_type_ids)))


class SpanExtractor(nn.Module):
    """backbone -> linear to 2 scores per token: (B, T) -> (start logits (B, T), end logits (B, T))."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.dim, 2)
        self.init_weights()

    def init_weights(self) -> None:
        _init_linear(self.head)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logits = self.head(_encode(self.backbone, input_ids, attention_mask, token_type_ids))  # (B, T, 2)
        start, end = logits.unbind(-1)
        return start, end


HEAD_KINDS = ("sequence-classification", "token-classification", "span")


@dataclass
class HeadSpec:
    """Which task head sits on a backbone; saved with the model so that it reloads.

    kind: "sequence-classification", "token-classification" or "span" (extractive QA);
    labels: label names in id order (classification); pooling: see SequenceClassifier;
    multi_label: independent sigmoid per label instead of one softmax; bias: the head's bias;
    hidden: a sequence classifier's hidden layer (HIDDEN_LAYERS), or None.
    """

    kind: str
    labels: list[str] = field(default_factory=list)
    pooling: str = "pooler"
    multi_label: bool = False
    bias: bool = True
    hidden: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"HeadSpec.kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if self.hidden is not None and (self.kind != "sequence-classification" or self.hidden not in HIDDEN_LAYERS):
            raise ValueError(f"HeadSpec.hidden: a hidden layer ({', '.join(HIDDEN_LAYERS)}) belongs to a "
                             f"sequence-classification head, got {self.hidden!r} on {self.kind}")
        if self.kind != "span" and not self.labels:
            raise ValueError(f"HeadSpec.labels: a {self.kind} head needs at least one label")

    def to_dict(self) -> dict:
        return asdict(self)


def attach_head(backbone: nn.Module, spec: HeadSpec | None) -> nn.Module:
    """Wrap a backbone with the head `spec` describes (None: the backbone itself)."""
    if spec is None:
        return backbone
    if spec.kind == "sequence-classification":
        return SequenceClassifier(backbone, len(spec.labels), spec.pooling, bias=spec.bias, hidden=spec.hidden)
    if spec.kind == "token-classification":
        return TokenClassifier(backbone, len(spec.labels))
    return SpanExtractor(backbone)
