"""Test set-up: the Triton interpreter on machines without a GPU, and the `gpu` marker.

TRITON_INTERPRET must be set before triton is imported, so it is set here, before any
test module imports genkernels.
"""

import os
import zlib

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs in every test, from a seed derived from its name: a failure reproduces.

    GENKERNELS_TEST_SEED=k shifts every seed, to run the suite on other inputs.
    """
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("GENKERNELS_TEST_SEED", "0")))


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_GPU else "cpu")
