"""llama.cpp runs what `lmforge convert --to gguf` writes: same tokens, same logits.

A small GPT-2 and a small Llama (grouped-query attention) are trained for a few hundred
steps on Tiny Shakespeare with a byte-level BPE tokenizer lmforge trained (a trained model
has peaked next-token distributions, so disagreements show), exported to GGUF in f32, f16
and q8_0, and loaded by llama.cpp through llama-cpp-python (its vendored llama.cpp, built
from the PyPI sdist: `pip install llama-cpp-python`; not a dependency of lmforge). For
each file it reports:

- tokenization: llama.cpp's tokens of held-out text == lmforge's (vocabulary, merges and
  the pre-tokenizer in the metadata);
- logits: the largest |llama.cpp - lmforge| over every position of a 64-token prompt,
  against the largest |logit|, and the share of positions whose argmax agrees;
- greedy decoding: 32 new tokens from llama.cpp against lmforge's generate.

    PYTHONPATH=src python bench/gguf_llamacpp.py [--steps 300] [--out DIR]

Not a test: it needs llama-cpp-python, which compiles llama.cpp (minutes).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

import lmforge
from lmforge.interop.gguf import write_gguf
from lmforge.models import GPTConfig, build
from lmforge.tokenizer import train_tokenizer

FAMILIES = {
    "gpt2": dict(act="gelu_tanh"),
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu", act="silu", bias=False, n_kv_heads=2,
                  hidden_dim=256, tie_embeddings=False),
}


def train_small(family: str, tok, ids: torch.Tensor, steps: int, seed: int = 0) -> torch.nn.Module:
    """A dim-128, 4-layer model trained on `ids` with AdamW (plain loop; a few hundred steps)."""
    torch.manual_seed(seed)
    model = build(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=128, dim=128, n_layers=4, n_heads=4,
                            dropout=0.0, **FAMILIES[family]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, ids.numel() - 129, (16,), generator=g)
        batch = torch.stack([ids[s:s + 129] for s in start.tolist()])
        logits = model(batch[:, :-1])[..., :tok.vocab_size]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"{family}: trained {steps} steps, last loss {loss.item():.3f}")
    return model.eval()


def compare(family: str, model, tok, path: Path, prompt_ids: list[int], text: str) -> dict:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0)
    ours_tokens = tok.encode(text)
    theirs_tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    llm.reset()
    llm.eval(prompt_ids)
    theirs = np.array(llm.scores[:len(prompt_ids)], dtype=np.float32)  # a copy: generating reuses the buffer
    with torch.no_grad():
        ours = model(torch.tensor([prompt_ids]))[0, :, :tok.vocab_size].float().numpy()
    diff = np.abs(theirs[:, :tok.vocab_size] - ours)
    lm = lmforge.LM(model, tok)
    prompt = tok.decode(prompt_ids[:16], skip_special_tokens=False)
    ours_text = lm.generate(prompt, max_new_tokens=32, temperature=0.0)[0]
    theirs_text = llm.create_completion(prompt, max_tokens=32, temperature=0.0, top_k=1)["choices"][0]["text"]
    return {"family": family, "file": path.name, "mb": round(path.stat().st_size / 2**20, 2),
            "tokens_equal": ours_tokens == theirs_tokens, "n_tokens": len(ours_tokens),
            "max_abs_logit_diff": float(diff.max()), "max_abs_logit": float(np.abs(ours).max()),
            "argmax_agree": float((theirs[:, :tok.vocab_size].argmax(-1) == ours.argmax(-1)).mean()),
            "greedy_equal": ours_text == theirs_text, "ours": ours_text[:60], "theirs": theirs_text[:60]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None, help="keep the GGUF files and results.json here")
    args = parser.parse_args()
    import llama_cpp

    torch.set_num_threads(2)
    corpus = resources.files("lmforge").joinpath("corpus/tinyshakespeare.txt").read_text(encoding="utf-8")
    train_text, held_out = corpus[:-20000], corpus[-20000:]
    tok = train_tokenizer(texts=train_text.split("\n\n"), kind="bpe", vocab_size=1024)
    ids = torch.tensor(tok.encode(train_text[:400000]))
    prompt_ids = tok.encode(held_out[:2000])[:64]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    rows = []
    for family in FAMILIES:
        model = train_small(family, tok, ids, args.steps)
        for dtype in ("f32", "f16", "q8_0"):
            started = time.perf_counter()
            path = write_gguf(model, tok, out / f"{family}-{dtype}.gguf", dtype)
            row = compare(family, model, tok, path, prompt_ids, held_out[:3000])
            row["dtype"], row["write_s"] = dtype, round(time.perf_counter() - started, 2)
            rows.append(row)
            print(json.dumps(row))
    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "llama_cpp_python": llama_cpp.__version__, "steps": args.steps, "rows": rows}
    (out / "results.json").write_text(json.dumps(info, indent=1))
    print("| model | dtype | MB | tokens equal | max abs logit diff (max abs logit) | argmax agree | greedy equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['dtype']} | {r['mb']} | {r['tokens_equal']} ({r['n_tokens']}) | "
              f"{r['max_abs_logit_diff']:.2e} ({r['max_abs_logit']:.1f}) | {r['argmax_agree']:.3f} | "
              f"{r['greedy_equal']} |")


if __name__ == "__main__":
    main()
