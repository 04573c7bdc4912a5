"""The training engine: one loop (loop.py) shared by pretraining and fine-tuning, the
pretraining objectives, AdamW and its schedule, exact-resume checkpoints, and run logging."""
