"""Loading a real-size checkpoint: lmforge.load against transformers' from_pretrained.

    python bench/bench_load.py                       # a 0.5B Qwen2 (Qwen2.5-0.5B's shape), fp32
    python bench/bench_load.py --dtype bfloat16      # the same checkpoint read into bf16

The checkpoint is a random-init Qwen2ForCausalLM of Qwen2.5-0.5B's shape (hidden 896, 24
layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings), written once
by transformers' save_pretrained (one model.safetensors, or shards with --shard-size).
Each load runs in a fresh process (peak RSS is a per-process number), the two sides
alternating, --repeats times each; reported: the median wall time from the start of the
load call to a model ready for inference (imports excluded, timed separately), and the
time to a model that has run one forward pass (transformers maps the file and reads
the weights lazily, during that first pass), and the peak resident set (ru_maxrss) above
the process's RSS before the call, as the load returns and after the first pass, against
the size of the weights. Both sides end with the same logits (checked on one batch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
side, path, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if side == "lmforge":
    import lmforge
    before = rss(); base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    model = lmforge.load(path, dtype=None if dtype == "float32" else dtype).model
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
else:
    import transformers
    before = rss(); base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.eval()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ids = torch.arange(8)[None] * 97 % 151936
with torch.no_grad():
    out = model(ids)
    logits = (out.logits if hasattr(out, "logits") else out)[0, -1, :151936].float()
ready = time.perf_counter() - t
peak_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_above": peak - before, "ready": ready, "peak_ready": peak_ready - before,
                  "head": logits[:8].tolist(), "norm": float(logits.norm())}))
"""


def make_checkpoint(path: Path, shard_size: str | None) -> int:
    import torch
    import transformers as hf

    cfg = hf.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = hf.Qwen2ForCausalLM(cfg)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kw)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shard-size", default=None, help="save the checkpoint in shards of this size (e.g. 500MB)")
    p.add_argument("--checkpoint", default=None, help="reuse this directory (written if missing)")
    a = p.parse_args()
    import torch
    import transformers

    import lmforge

    tmp = tempfile.TemporaryDirectory()
    path = Path(a.checkpoint or Path(tmp.name) / "qwen2-0.5b")
    if not (path / "config.json").exists():
        print(f"writing the checkpoint to {path} ...", flush=True)
        make_checkpoint(path, a.shard_size)
    files = [f for f in path.iterdir() if f.suffix == ".safetensors"]
    file_bytes = sum(f.stat().st_size for f in files)
    weight_bytes = file_bytes // (2 if a.dtype == "bfloat16" else 1)  # what the model holds in memory
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, lmforge {lmforge.__version__}, "
          f"{a.threads} threads, {len(files)} file(s), {file_bytes / 1e9:.2f} GB on disk, load "
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    results: dict[str, list[dict]] = {"lmforge": [], "transformers": []}
    for r in range(a.repeats):
        for side in (("lmforge", "transformers") if r % 2 == 0 else ("transformers", "lmforge")):
            out = subprocess.run([sys.executable, "-c", CHILD, side, str(path), a.dtype, str(a.threads)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[side].append(row)
            print(f"  {side}: {row['seconds']:.2f} s, peak +{row['peak_above'] / 1e9:.2f} GB", flush=True)
    ours, theirs = results["lmforge"][-1], results["transformers"][-1]
    same = max(abs(x - y) for x, y in zip(ours["head"], theirs["head"]))
    print(f"\nweights in memory: {weight_bytes / 1e9:.2f} GB ({a.dtype}); max |logit difference| {same:.2e}; "
          f"load at the end {'/'.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| side | load call (s) | load + first forward (s) | peak RSS at load return | peak RSS after the "
          "first forward | that peak / weights |")
    print("|---|---|---|---|---|---|")

    def med(side: str, key: str) -> float:
        return statistics.median(x[key] for x in results[side])

    for side in results:
        print(f"| {side} | {med(side, 'seconds'):.2f} | {med(side, 'ready'):.2f} | "
              f"{med(side, 'peak_above') / 1e9:.2f} GB | {med(side, 'peak_ready') / 1e9:.2f} GB | "
              f"{med(side, 'peak_ready') / weight_bytes:.2f}x |")
    print(f"\nto a model that has run: lmforge {med('transformers', 'ready') / med('lmforge', 'ready'):.2f}x "
          f"transformers' speed")


if __name__ == "__main__":
    main()
