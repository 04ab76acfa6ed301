"""One intra-op thread for the model tests."""

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """At these tiny shapes a second intra-op thread gains little, and on a busy machine spinning OpenMP
    threads slow every op several times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
