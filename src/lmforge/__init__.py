"""lmforge: from raw text to trained Transformer language models.

    import lmforge
    lm = lmforge.load("runs/quickstart/model")          # lmforge or Hugging Face directory
    print(lm.generate("ROMEO:", max_new_tokens=40))
"""

__version__ = "0.1.0"

from lmforge.api import LM, load  # noqa: E402
from lmforge.models import BertConfig, EncoderDecoderConfig, GPTConfig, build, preset  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

__all__ = ["LM", "BertConfig", "EncoderDecoderConfig", "GPTConfig", "Tokenizer", "build", "load", "preset"]
