"""Training FLOPs per token: the one formula (PaLM, appendix B) behind the training log's
MFU and the planner's textbook estimate.

    decoder or encoder:  6 N + 12 L H Q T                per token
    encoder-decoder:     6 (N_src S + N_tgt T) + 12 H Q (L_enc S^2 + L_dec (T^2 + T S))   per sequence

N: the parameters a token's matmuls go through (2 FLOPs per multiply-add, x3 for forward
and backward); L layers, H heads, Q head dim, T (target) and S (source) lengths: the
attention scores and their product with the values, which N does not count. Which
parameters N counts is the caller's to say (the log counts the matmul weights a token
really meets, the planner the textbook N without position embeddings).
"""

from __future__ import annotations


def flops_per_token(n: float, n_layers: int, n_heads: int, head_dim: int, seq_len: float) -> float:
    """6 N + 12 L H Q T."""
    return 6.0 * n + 12.0 * n_layers * n_heads * head_dim * seq_len


def encdec_flops_per_sequence(n_src: float, n_tgt: float, n_heads: int, head_dim: int, enc_layers: int,
                              dec_layers: int, src_len: float, tgt_len: float) -> float:
    """6 (N_src S + N_tgt T) + 12 H Q (L_enc S^2 + L_dec (T^2 + T S)): the encoder's tokens go
    through N_src (the encoder, and the decoder's cross-attention keys and values), the
    decoder's through N_tgt."""
    S, T = src_len, tgt_len
    attn = n_heads * head_dim * (enc_layers * S * S + dec_layers * (T * T + T * S))
    return 6.0 * (n_src * S + n_tgt * T) + 12.0 * attn
