"""Evaluation tests run torch on one thread: on a shared 2-core box two intra-op threads
competing with other processes made small steps ~25x slower (measured)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Use one intra-op thread for the module, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
