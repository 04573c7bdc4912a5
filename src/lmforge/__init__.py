"""lmforge: from raw text to trained Transformer language models.

    import lmforge
    lm = lmforge.load("runs/quickstart/model")          # lmforge or Hugging Face directory
    print(lm.generate("ROMEO:", max_new_tokens=40))
"""

__version__ = "0.1.0"

# Thread pools sized from the CPUs this process may use, and OpenMP's idle threads asleep rather
# than spinning (lmforge.hardware.cpu_thread_env): set before torch loads OpenMP, which reads them once.
from lmforge import hardware as _hardware  # noqa: E402

_hardware.cpu_thread_env()

from lmforge.api import LM, load  # noqa: E402
from lmforge.models import BertConfig, EncoderDecoderConfig, GPTConfig, build, preset  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

_hardware.set_torch_threads()  # in case torch was imported (and sized its threads) before lmforge

__all__ = ["LM", "BertConfig", "EncoderDecoderConfig", "GPTConfig", "Tokenizer", "build", "load", "preset"]
