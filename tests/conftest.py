"""Fixtures shared by several test modules."""
import sys
from pathlib import Path

import pytest
import torch

# scripts/hub_server.py: the local Hub the tests (and the demo) publish to and download from
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster, and far faster on a busy machine (no spinning thread pools)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
