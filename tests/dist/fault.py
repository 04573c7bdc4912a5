"""`lmforge` with a fault: the process of rank LMFORGE_FAULT_RANK kills itself (SIGKILL, as an
out-of-memory killer or a lost node would) just before optimizer step LMFORGE_FAULT_STEP, once:
the marker file LMFORGE_FAULT_MARKER records that it happened, so a restarted worker runs on.
Not collected by pytest; started by the end-to-end tests under torchrun.

usage: torchrun ... fault.py pretrain|finetune ... (lmforge's own arguments)
"""

import os
import signal
import sys
from pathlib import Path

from lmforge import cli
from lmforge.train import loop

_step = loop._train_step


def _train_step_with_fault(run, batches):
    marker = Path(os.environ["LMFORGE_FAULT_MARKER"])
    if (run.step + 1 == int(os.environ["LMFORGE_FAULT_STEP"]) and run.env.rank == int(os.environ["LMFORGE_FAULT_RANK"])
            and not marker.exists()):
        marker.write_text(f"killed rank {run.env.rank} before step {run.step + 1}\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return _step(run, batches)


loop._train_step = _train_step_with_fault
cli.main(sys.argv[1:])
