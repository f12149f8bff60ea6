"""Shared test helpers: make the repo root importable and skip GPU tests cleanly."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _has_cuda():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _has_cupy():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CuPy installed without a working driver
        return False


requires_cuda = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
requires_cupy = pytest.mark.skipif(not _has_cupy(), reason="needs CuPy and a CUDA GPU")


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared machine: one torch thread avoids OpenMP oversubscription stalls."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
