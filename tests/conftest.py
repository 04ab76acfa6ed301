"""Test set-up: the Triton interpreter on machines without a GPU, the `gpu` marker, and an inductor cache
of this source tree.

TRITON_INTERPRET must be set before triton is imported, so it is set here, before any
test module imports genkernels.
"""

import hashlib
import os
import pathlib
import tempfile
import zlib

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _inductor_cache_dir() -> str:
    """A torch.compile cache directory of this version of the ops. Inductor's cache keys do not cover a custom
    op's fake implementation, so an artifact compiled against an older fake (other output strides, say) would
    be served again and fail its stride checks; a directory per hash of genkernels/ops keeps the cache across
    runs of the same code and starts a fresh one when an op changes."""
    ops = pathlib.Path(__file__).resolve().parent.parent / "genkernels" / "ops"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(ops.glob("*.py")))).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"genkernels-inductor-{digest}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())


def _shard(items):
    """GENKERNELS_TEST_SHARD=i/n keeps every n-th test from the i-th: n processes run the suite in parallel."""
    spec = os.environ.get("GENKERNELS_TEST_SHARD")
    if not spec:
        return
    try:
        index, count = (int(p) for p in spec.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"GENKERNELS_TEST_SHARD must be i/n with 0 <= i < n, got {spec!r}") from None
    items[:] = items[index::count]


def pytest_collection_modifyitems(config, items):
    _shard(items)
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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): at tiny
    shapes a second thread gains little, and on a busy machine spinning OpenMP threads cost more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits():
    """The scikit-learn 8x8 digits as a genkernels ImageDataset (1797 images, 10 classes)."""
    from genkernels import data

    return data.digits()
