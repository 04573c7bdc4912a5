"""Text generation: sampling functions, decoding loops with a preallocated KV cache, text API.

    sampling.py  pure functions on logits (penalties, filters, greedy, sample)
    decode.py    prefill + one-token decode steps, greedy/sampling loop, beam search
    text.py      strings in, strings out: tokenize, generate, decode, stop strings, streaming, chat
"""

from lmforge.generate.chat import chat_prompt
from lmforge.generate.decode import (
    CompiledDecodeStep,
    GenerationConfig,
    GenerationOutput,
    Step,
    beam_search,
    compile_decode_step,
    encdec_decode_step,
    generate,
    gpt_decode_step,
    iter_generate,
)
from lmforge.generate.text import detokenize_stream, generate_text, stream_text

__all__ = [
    "CompiledDecodeStep", "GenerationConfig", "GenerationOutput", "Step", "beam_search", "chat_prompt",
    "compile_decode_step", "detokenize_stream", "encdec_decode_step", "generate", "generate_text",
    "gpt_decode_step", "iter_generate", "stream_text",
]
