"""tests/gpu: every device kernel against a float64 numpy reference, and the engine on a device.

They need a build with a GPU backend (`PYSERVE_CUDA=1 pip install -e .` or `PYSERVE_HIP=1`) and a
device; without either, every test here is reported as skipped, with the reason.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from pyserve import _C


def _why_not() -> str | None:
    gpu = getattr(_C, "gpu", None)
    if gpu is None:
        return "pyserve._C was built without a GPU backend (PYSERVE_CUDA=1 / PYSERVE_HIP=1 pip install -e .)"
    if gpu.device_count() == 0:
        return "no GPU device visible"
    return None


_REASON = _why_not()


def pytest_collection_modifyitems(config, items):
    if _REASON is None:
        return
    skip = pytest.mark.skip(reason=_REASON)
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture
def gpu():
    """The `pyserve._C.gpu` probe module (each kernel on numpy arrays)."""
    return _C.gpu


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: fresh inputs per test, the same on every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
