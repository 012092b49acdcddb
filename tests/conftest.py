"""Shared test setup.

* Every test starts from an empty Pyro param store, seed 0 and float32 as the default dtype (as in Pyro's
  own tests/conftest.py).
* The real data sets live read-only at ``<repo>/../shared/data``; when that directory exists,
  ``PPL_MODELS_DATA`` defaults to it (an already-set value wins), so loaders find the files
  without downloading.  The ``shared_data`` fixture returns that directory, or skips the test
  when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# The directory the session uses for real data, fixed when pytest starts (see pytest_configure).
_SHARED_DATA: Path | None = None


def pytest_configure(config):
    global _SHARED_DATA
    if DEFAULT_SHARED_DATA.is_dir():
        os.environ.setdefault("PPL_MODELS_DATA", str(DEFAULT_SHARED_DATA))
    _SHARED_DATA = Path(os.environ.get("PPL_MODELS_DATA") or DEFAULT_SHARED_DATA)


@pytest.fixture(autouse=True)
def _reset_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(torch.float32)  # a test that switches to float64 never leaks it into the next


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype (exact comparisons against quadrature)."""
    torch.set_default_dtype(torch.float64)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The directory of real data files (``<root>/mnist/...``, ``<root>/binarized_mnist/...``, ...)."""
    path = _SHARED_DATA if _SHARED_DATA is not None else DEFAULT_SHARED_DATA
    if not path.is_dir():
        pytest.skip(
            f"real data directory {path} is missing: set PPL_MODELS_DATA to a copy of shared/data "
            f"(default {DEFAULT_SHARED_DATA})"
        )
    return path
