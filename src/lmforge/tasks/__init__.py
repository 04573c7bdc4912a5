"""Fine-tuning tasks: one module per task (data + head + loss + metric), all trained by one
driver (lmforge.tasks.driver) on lmforge's one training loop.

    classify     text / text-pair classification, single- or multi-label
    ner          token classification (BIO tags), entity-level F1
    qa           extractive question answering (SQuAD v1.1 / v2.0)
    summarize    sequence-to-sequence summarization (ROUGE)
    translate    sequence-to-sequence translation (BLEU, chrF)
    sft          supervised instruction tuning on chat data
    perplexity   evaluation only: perplexity / bits per character of a causal LM

    finetune("classify", model=..., train=..., valid=..., out=..., epochs=3)
    evaluate("classify", model=..., data=..., out=...)

Tasks are registered here by name; `TASKS` maps names to tasks.
"""

from lmforge.tasks.base import TASKS, Base, FinetuneConfig, Setup, Task, get_task, register
from lmforge.tasks.classify import Classify
from lmforge.tasks.driver import evaluate, finetune
from lmforge.tasks.ner import Ner
from lmforge.tasks.perplexity import Perplexity
from lmforge.tasks.qa import ExtractiveQA
from lmforge.tasks.seq2seq import Summarize, Translate
from lmforge.tasks.sft import Sft

for _task in (Classify(), Ner(), ExtractiveQA(), Summarize(), Translate(), Sft(), Perplexity()):
    register(_task)

__all__ = ["TASKS", "Base", "FinetuneConfig", "Setup", "Task", "evaluate", "finetune", "get_task", "register"]
