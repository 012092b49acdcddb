"""The threading policy: ``OMP_WAIT_POLICY=PASSIVE`` by default, set only before torch loads OpenMP, never
over the user's own setting."""

import os
import subprocess
import sys

from ppl_models import runtime


def _run(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environ).stdout


def test_configure_before_torch_sets_passive_and_openmp_reads_it():
    code = ("from ppl_models import runtime; print(runtime.configure_threads()); import os, torch; "
            "print(os.environ['OMP_WAIT_POLICY'])")
    assert _run(code).split() == ["True", "PASSIVE"]


def test_configure_keeps_the_users_setting():
    code = "from ppl_models import runtime; runtime.configure_threads(); import os; print(os.environ['OMP_WAIT_POLICY'])"
    assert _run(code, OMP_WAIT_POLICY="ACTIVE").strip() == "ACTIVE"


def test_configure_after_torch_changes_nothing():
    import torch  # noqa: F401  (already loaded in the test process)

    environ = {}
    assert runtime.configure_threads(environ) is False and environ == {}
