"""PEFT LoRA adapters in and out: lmforge's LoRA layers <-> a directory that peft loads.

peft (Hugging Face's parameter-efficient fine-tuning library) keeps a LoRA adapter as
adapter_config.json + adapter_model.safetensors, its tensors named after the transformers
module they adapt:

    base_model.model.<module>.lora_A.weight    (r, in)
    base_model.model.<module>.lora_B.weight    (out, r)
    base_model.model.<head>.weight / .bias     a task head trained in full (modules_to_save)

and computes y = base(x) + (lora_alpha / r) x A^T B^T (alpha / sqrt(r) with use_rslora), as
lmforge.nn.lora does. Which transformers module an lmforge layer is comes from the rules of
interop/hf.py. lmforge fuses projections that transformers keeps apart (q, k, v -> wqkv in
Llama, BERT and BART): an adapter on wqkv is written as three peft adapters that share A,
each with its own rows of B (the same update, exactly); peft's separate q/k/v adapters read
into one wqkv stack their A's and place each B in its own block of rows and columns (rank
the sum of theirs; again exact).

    save_adapter(model, head, "out/adapter", base_model="runs/bert/model")
    model, head = load_adapter(model, head, "out/adapter")      # unmerged LoRALinear layers
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save
from torch import Tensor, nn

from lmforge.files import Ownership, atomic_write_bytes, atomic_write_json, owned_dir
from lmforge.interop.hf import (
    ARCHITECTURES,
    HEAD_TENSOR,
    HIDDEN_TENSOR,
    PREFIXES,
    backbone_rules,
    export_architecture,
    export_prefix,
    head_from_hf,
    model_type_of_model,
)
from lmforge.models import HeadSpec, attach_head
from lmforge.models.provenance import untrained
from lmforge.models.weights import read_safetensors
from lmforge.nn.lora import LoRALinear, lora_layers, wrap_linear
from lmforge.tokenizer import Tokenizer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
TASK_TYPES = {"sequence-classification": "SEQ_CLS", "token-classification": "TOKEN_CLS", "span": "QUESTION_ANS"}
HEAD_OF_TASK_TYPE = {task_type: kind for kind, task_type in TASK_TYPES.items()}
LM_TASK_TYPES = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "mistral": "CAUSAL_LM", "qwen2": "CAUSAL_LM",
                 "qwen3": "CAUSAL_LM", "bart": "SEQ_2_SEQ_LM", "t5": "SEQ_2_SEQ_LM", "bert": None}
# adapter_config.json settings that change what an adapter computes and lmforge does not do.
UNSUPPORTED = {"use_dora": False, "lora_bias": False, "bias": "none", "layer_replication": None,
               "trainable_token_indices": None, "target_parameters": None}

ADAPTER_DIR = Ownership(adopt=lambda path: (path / CONFIG_FILE).is_file(), what="adapter directory")


@dataclass(frozen=True)
class Target:
    """One lmforge linear layer as transformers' modules: their names (in the exported
    class, prefix included) and output rows; transpose for GPT-2's Conv1D (fan_in_fan_out)."""

    modules: tuple[str, ...]
    rows: tuple[int, ...]
    transpose: bool


def targets(backbone: nn.Module, prefix: str) -> dict[str, Target]:
    """lmforge linear layer name (relative to the backbone) -> its transformers modules."""
    by_ours = {r.ours: r for r in backbone_rules(backbone.config, prefix)}
    out = {}
    for name, layer in backbone.named_modules():
        rule = by_ours.get(f"{name}.weight")
        if not isinstance(layer, nn.Linear) or rule is None:
            continue
        n = len(rule.theirs)
        rows = rule.split or (layer.out_features // n,) * n
        out[name] = Target(tuple(t.removesuffix(".weight") for t in rule.theirs), tuple(rows), rule.transpose)
    return out


# ----------------------------------------------------------------------------- out


def _backbone(model: nn.Module, head: HeadSpec | None) -> nn.Module:
    return model.backbone if head is not None else model


def adapter_state(model: nn.Module, head: HeadSpec | None,
                  base_model: str | None = None) -> tuple[dict, dict[str, Tensor]]:
    """The LoRA layers of `model` (and its task head) -> (adapter_config.json dict, tensors)."""
    backbone = _backbone(model, head)
    layers = lora_layers(backbone)
    if not layers:
        raise ValueError("the model has no LoRA layers to save as an adapter")
    kind = model_type_of_model(backbone)
    arch = export_architecture(kind, head, untrained(backbone))
    prefix = export_prefix(kind, arch)
    where = targets(backbone, prefix)
    tensors: dict[str, Tensor] = {}
    ranks, alphas, transposed = {}, {}, set()
    for name, layer in layers.items():
        target = where[name]
        for module, b in zip(target.modules, layer.lora_B.detach().split(list(target.rows), dim=0)):
            tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = layer.lora_A.detach().clone()
            tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.clone()
            suffix = module.removeprefix(prefix)  # matches the module in any class with this backbone
            ranks[suffix], alphas[suffix] = layer.rank, layer.alpha
            transposed.add(target.transpose)
    saved = None
    if head is not None:
        names = []
        for module, name in _head_modules(model, arch):
            names.append(name)
            for part, value in module.state_dict().items():
                tensors[f"{KEY_PREFIX}{name}.{part}"] = value.detach().clone()
        # peft saves whole modules: RoBERTa's classifier (dense + out_proj) is one of them
        parents = {n.rpartition(".")[0] for n in names}
        saved = sorted(parents) if len(names) > 1 and len(parents) == 1 and "" not in parents else names
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropout = next(iter(layers.values())).lora_dropout.p
    config = {"peft_type": "LORA", "task_type": TASK_TYPES[head.kind] if head else LM_TASK_TYPES.get(kind),
              "base_model_name_or_path": base_model, "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": sorted(ranks), "fan_in_fan_out": True in transposed, "bias": "none",
              "modules_to_save": saved, "inference_mode": True, "use_rslora": False, "use_dora": False,
              "rank_pattern": {k: v for k, v in ranks.items() if v != r},
              "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha}}
    return config, {k: v.cpu().contiguous() for k, v in tensors.items()}


def _head_modules(model: nn.Module, arch: str) -> list[tuple[nn.Module, str]]:
    """The task head's trained layers with transformers' names in class `arch`: the output
    layer, and a sequence classifier's hidden layer (RoBERTa's classifier.dense)."""
    out = [(model.head, HEAD_TENSOR[arch])]
    if getattr(model, "hidden", None) is not None:
        out.insert(0, (model.hidden.dense, HIDDEN_TENSOR[arch]))
    return out


def save_adapter(model: nn.Module, head: HeadSpec | None, path: str | os.PathLike, *,
                 base_model: str | None = None, tokenizer: Tokenizer | None = None, overwrite: bool = False) -> Path:
    """Write `model`'s LoRA adapters as a peft adapter directory (atomically; an existing
    adapter directory has its files replaced, nothing else), with the tokenizer when given.
    base_model: recorded as base_model_name_or_path, the model that peft users load first."""
    config, tensors = adapter_state(model, head, base_model)
    path = Path(path)
    with owned_dir(path, ADAPTER_DIR, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / CONFIG_FILE, config)
        atomic_write_bytes(tmp / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


# ----------------------------------------------------------------------------- in


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """adapter_config.json and the adapter's tensors (keys without base_model.model.)."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a PEFT adapter directory (no {CONFIG_FILE})")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type {config.get('peft_type')!r}: only LORA adapters are supported")
    for key, plain in UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, False, [], {}):
            raise ValueError(f"{config_file}: {key}={config[key]!r} is not supported (only plain LoRA)")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}")
    tensors = read_safetensors(weights)
    return config, {k.removeprefix(KEY_PREFIX): v for k, v in tensors.items()}


def _pattern(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: a key matches a module name ending in it."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _resolve(backbone: nn.Module, modules: list[str], source: str) -> tuple[str, dict[str, tuple[str, int]]]:
    """The backbone prefix under which every adapted module exists -> (prefix, module ->
    (lmforge layer, part)); else ValueError naming the first tensor that fits nowhere."""
    kind = model_type_of_model(backbone)
    best: tuple[int, str, dict] | None = None
    for prefix in PREFIXES[kind]:
        where = {m: (ours, i) for ours, t in targets(backbone, prefix).items() for i, m in enumerate(t.modules)}
        found = sum(m in where for m in modules)
        if found == len(modules):
            return prefix, where
        best = max(best or (-1, "", {}), (found, prefix, where), key=lambda b: b[0])
    bad = next(m for m in modules if m not in best[2])
    known = sorted({m.removeprefix(best[1]).split(".")[-1] for m in best[2]})
    raise ValueError(f"{source}: tensor {KEY_PREFIX}{bad}.lora_A.weight adapts a module the {kind} model does "
                     f"not have (its linear layers: {', '.join(known)})")


def _adapter_parts(config: dict, tensors: dict[str, Tensor], backbone: nn.Module,
                   source: str) -> tuple[dict[str, dict[int, tuple[Tensor, Tensor, float]]], dict[str, Target]]:
    """(lmforge layer -> {part: (A (r, in), B (rows, r), scale)}, every shape checked; the
    layers' targets under the prefix the adapter uses)."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    for key in tensors:
        if ".lora_" in key and not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{source}: tensor {KEY_PREFIX}{key}: only linear-layer adapters (lora_A/lora_B) "
                             "are supported")
    prefix, where = _resolve(backbone, modules, source)
    shapes = targets(backbone, prefix)
    parts: dict[str, dict[int, tuple[Tensor, Tensor, float]]] = {}
    for module in modules:
        ours, i = where[module]
        suffix = module.removeprefix(prefix)
        r = _pattern(config.get("rank_pattern"), suffix, config.get("r", 8))
        alpha = _pattern(config.get("alpha_pattern"), suffix, config.get("lora_alpha", 8))
        in_features = backbone.get_submodule(ours).in_features
        want = {"A": (r, in_features), "B": (shapes[ours].rows[i], r)}
        got = {}
        for x in "AB":
            key = f"{module}.lora_{x}.weight"
            if key not in tensors:
                raise ValueError(f"{source}: tensor {KEY_PREFIX}{key} is missing (its lora_{'BA'[x == 'B']} is there)")
            if tuple(tensors[key].shape) != want[x]:
                raise ValueError(f"{source}: tensor {KEY_PREFIX}{key} has shape {tuple(tensors[key].shape)}, "
                                 f"the model's {ours} with r={r} needs {want[x]}")
            got[x] = tensors[key]
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        parts.setdefault(ours, {})[i] = (got["A"], got["B"], scale)
    return parts, shapes


def _attach(backbone: nn.Module, name: str, parts: dict[int, tuple[Tensor, Tensor, float]], target: Target,
            dropout: float) -> LoRALinear:
    """One LoRALinear computing the sum of the parts' updates, each on its rows."""
    first = parts[next(iter(parts))]
    shared = len(parts) == len(target.rows) and all(
        torch.equal(a, first[0]) and s == first[2] for a, _, s in parts.values())
    if shared:  # lmforge's own layout: one A, B stacked by rows
        rank = first[0].size(0)
        a, b, alpha = first[0], torch.cat([parts[i][1] for i in range(len(target.rows))]), first[2] * rank
    else:  # separate adapters: A's stacked, each B (scaled) in its own block
        rank = sum(p[0].size(0) for p in parts.values())
        a = torch.cat([parts[i][0] for i in sorted(parts)])
        b = torch.zeros(sum(target.rows), rank, dtype=a.dtype)
        col = 0
        for i in sorted(parts):
            _, part_b, scale = parts[i]
            row = sum(target.rows[:i])
            b[row:row + part_b.size(0), col:col + part_b.size(1)] = part_b * scale
            col += part_b.size(1)
        alpha = float(rank)  # scale 1: each block carries its own
    layer = wrap_linear(backbone, name, rank, alpha, dropout)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    return layer


def _head_from_adapter(model: nn.Module, head: HeadSpec | None, config: dict, saved: dict[str, Tensor],
                       source: str) -> tuple[nn.Module, HeadSpec | None]:
    """Load the adapter's task head (modules_to_save), attaching one when the base has none."""
    if not saved:
        return model, head
    backbone = _backbone(model, head)
    kind = model_type_of_model(backbone)
    head_kind = HEAD_OF_TASK_TYPE.get(config.get("task_type"))
    arch = ARCHITECTURES.get((kind, head_kind))
    name, hidden = HEAD_TENSOR.get(arch), HIDDEN_TENSOR.get(arch)
    bad = [k for k in saved if name is None or k.rsplit(".", 1)[0] not in (name, hidden)]
    if bad:
        raise ValueError(f"{source}: tensor {KEY_PREFIX}{bad[0]} is neither a LoRA tensor nor the head of a "
                         f"{config.get('task_type')} {kind} model")
    if head is None or head.kind != head_kind:
        n = saved[f"{name}.weight"].size(0)
        head = head_from_hf({"architectures": [arch], "model_type": kind, "num_labels": n})
        model = attach_head(backbone, head)
    for module, module_name in _head_modules(model, arch):
        state = module.state_dict()
        parts = {p.rsplit(".", 1)[1]: v for p, v in saved.items() if p.rsplit(".", 1)[0] == module_name}
        for key, value in parts.items():
            if key not in state or state[key].shape != value.shape:
                raise ValueError(f"{source}: tensor {KEY_PREFIX}{module_name}.{key} has shape {tuple(value.shape)}, "
                                 f"the model's head needs "
                                 f"{tuple(state[key].shape) if key in state else 'no such tensor'}")
        if parts:
            module.load_state_dict(parts)
    return model, head


def load_adapter(model: nn.Module, head: HeadSpec | None, path: str | os.PathLike) -> tuple[nn.Module,
                                                                                          HeadSpec | None]:
    """Put the peft adapter in `path` onto `model` (in place: its linear layers become LoRALinear
    ones; a task head saved with the adapter is loaded, attached when the base has none).
    Returns (model, head). A mismatch (a module the model lacks, a shape or rank that does not
    fit) is a ValueError naming the tensor."""
    config, tensors = read_adapter(path)
    source = str(Path(path) / WEIGHTS_FILE)
    backbone = _backbone(model, head)
    parts, shapes = _adapter_parts(config, {k: v for k, v in tensors.items() if ".lora_" in k}, backbone, source)
    model, head = _head_from_adapter(model, head, config, {k: v for k, v in tensors.items() if ".lora_" not in k},
                                     source)
    for name, layer_parts in parts.items():
        _attach(backbone, name, layer_parts, shapes[name], float(config.get("lora_dropout") or 0.0))
    return model, head
