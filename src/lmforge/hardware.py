"""Accelerators by their datasheets: dense peak matmul FLOP/s per precision (no sparsity),
memory and memory bandwidth, of the SXM parts. The one table behind the training log's MFU
and the planner's GPU devices.

fp32 is plain fp32 (PyTorch leaves TF32 off by default, and so does lmforge).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Accelerator:
    """name: as reports show it; match: a substring of torch.cuda.get_device_name();
    peak: FLOP/s by precision; memory: bytes; bandwidth: bytes/s."""

    name: str
    match: str
    peak: dict[str, float]
    memory: int
    bandwidth: float


ACCELERATORS: dict[str, Accelerator] = {
    "h100": Accelerator("NVIDIA H100 SXM5 80GB (datasheet)", "H100",
                        {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 80 * GiB, 3.35e12),
    "h200": Accelerator("NVIDIA H200 SXM 141GB (datasheet)", "H200",
                        {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 141 * GiB, 4.8e12),
    "a100": Accelerator("NVIDIA A100 SXM4 80GB (datasheet)", "A100",
                        {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, 80 * GiB, 2.039e12),
    "l4": Accelerator("NVIDIA L4 24GB (datasheet)", "L4",
                      {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}, 24 * GiB, 0.3e12),
}


def accelerator_named(cuda_name: str) -> Accelerator | None:
    """The table's entry for a CUDA device name ("NVIDIA H100 80GB HBM3" -> h100), or None."""
    return next((a for a in ACCELERATORS.values() if a.match in cuda_name), None)
