"""Evaluation tests run torch and BLAS on one thread: on a shared 2-core box, two intra-op
threads competing with other processes made small steps ~25x slower (measured)."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch and one BLAS/OpenMP thread for the module, then the previous settings."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)
