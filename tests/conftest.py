import os
from pathlib import Path

import pytest
import torch

# Two xdist workers share the CI machine's two cores: one thread each.
torch.set_num_threads(int(os.environ.get("LMFORGE_TEST_THREADS", "1")))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """The small real datasets that live beside the repository (not shipped)."""
    if not SHARED_DATA.exists():
        pytest.skip("shared datasets not available")
    return SHARED_DATA
