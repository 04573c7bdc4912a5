"""Distributed training under torchrun: the process group, and DDP / FSDP2 applied from
outside the model (parallel.py)."""
