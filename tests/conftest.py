"""Shared test setup.

* Every test starts from an empty Pyro param store, seed 0 and float32 as the default dtype (as in Pyro's
  own tests/conftest.py).
* The real data sets live read-only at ``<repo>/../shared/data``; when that directory exists,
  ``PPL_MODELS_DATA`` defaults to it (an already-set value wins), so loaders find the files
  without downloading.  The ``shared_data`` fixture returns that directory, or skips the test
  when it is missing.
* ``--busy-load N`` (or ``PPL_MODELS_TEST_BUSY_LOAD=N``) runs the session beside N busy processes (one spinning
  Python loop each), as on a shared machine; the summary reports the session's wall time.  No test depends on
  wall-clock speed, so the suite must pass the same way (CI runs it with N = 3).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# The directory the session uses for real data, fixed when pytest starts (see pytest_configure).
_SHARED_DATA: Path | None = None


_BUSY: list = []
_STARTED = time.perf_counter()


def pytest_addoption(parser):
    parser.addoption("--busy-load", type=int, default=int(os.environ.get("PPL_MODELS_TEST_BUSY_LOAD", "0")),
                     metavar="N", help="run the tests beside N busy processes (a loaded machine)")


def pytest_sessionstart(session):
    n = session.config.getoption("--busy-load")
    if n < 0:
        raise pytest.UsageError(f"--busy-load: expected a non-negative integer, received {n}")
    _BUSY.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n))


def pytest_sessionfinish(session, exitstatus):
    for proc in _BUSY:
        proc.kill()
        proc.wait()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.getoption("--busy-load")
    if n:
        terminalreporter.write_line(f"busy load: {n} spinning processes ran beside the tests; session wall time "
                                    f"{time.perf_counter() - _STARTED:.0f} s")


def pytest_configure(config):
    global _SHARED_DATA
    if DEFAULT_SHARED_DATA.is_dir():
        os.environ.setdefault("PPL_MODELS_DATA", str(DEFAULT_SHARED_DATA))
    if os.environ.get("PPL_MODELS_DATA"):  # absolute: tests run commands from other working directories
        os.environ["PPL_MODELS_DATA"] = str(Path(os.environ["PPL_MODELS_DATA"]).resolve())
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


def _torch_threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (exact float64 comparisons, tiny problems), restored after it."""
    yield from _torch_threads(1)


@pytest.fixture
def two_threads():
    """torch on two threads for the test (the thread tuner's choices), restored after it."""
    yield from _torch_threads(2)


@pytest.fixture
def hansards_em_config(tmp_path, shared_data):
    """``make(source, target, name, model_lines, num_epochs)``: a config of an EM-fitted aligner (``[model]``
    ``model_lines``) on the Hansards test text alone (447 pairs; the direction ``source`` -> ``target``, file
    suffixes ``e``/``f``), lowercased, ``num_epochs`` EM iterations, no plots; written to ``tmp_path/<name>.toml``."""
    h = shared_data / "hansards_align"

    def make(source: str, target: str, name: str, model_lines: str, num_epochs: int) -> Path:
        config = tmp_path / f"{name}.toml"
        config.write_text(f"""
[model]
{model_lines}
[data]
name = "parallel"
source = "{h / f'test.{source}.gz'}"
target = "{h / f'test.{target}.gz'}"
lower = true
[train]
num_epochs = {num_epochs}
validate = false
[output]
plots = false
""")
        return config

    return make
