"""The process's runtime environment: the threading policy, and whether a launcher started this process.

**Threads.**  A run should be fast on an idle machine, and on a busy one no worse than one thread.

torch runs its CPU kernels on an OpenMP thread pool (one thread per core by default).  OpenMP's default wait
policy lets idle threads spin for a while before they sleep; on a machine where other processes compete for
the cores, a spinning thread burns the time slice its partner needs, and each parallel region waits for the
slowest thread's next slice.  Measured on this project's 2-core machine with two other busy processes: a
small MLP step at 4.7 steps/s with 2 threads against 103 with 1 thread; with ``OMP_WAIT_POLICY=PASSIVE``
(threads sleep at once) 2 threads ran like 1 (README, "Threads on a busy machine").

The command line (``ppl-models``) calls :func:`configure_threads` before it imports torch; it sets
``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets ``OMP_WAIT_POLICY``, and never changes the
number of threads (``OMP_NUM_THREADS`` or ``torch.set_num_threads`` remain the user's).  A Python program
gets the same by calling :func:`configure_threads` before its first ``import torch`` (OpenMP reads the variable
once, when torch loads it); called after that it only reports that it came too late.

**Launchers.**  :func:`in_torchrun` tells whether torchrun (or a launcher setting the same variables) started
this process.  This module imports neither torch nor Pyro, so the command line can use it before parsing.
"""

from __future__ import annotations

import os
import sys

__all__ = ["DEFAULT_WAIT_POLICY", "DEVICE_HELP", "configure_threads", "in_torchrun"]

DEFAULT_WAIT_POLICY = "PASSIVE"


def configure_threads(environ=None) -> bool:
    """Set ``OMP_WAIT_POLICY`` to :data:`DEFAULT_WAIT_POLICY` unless already set; ``True`` if it takes effect
    (torch not yet imported), ``False`` if torch was imported before (the variable is then left as it was)."""
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules:
        return False
    environ.setdefault("OMP_WAIT_POLICY", DEFAULT_WAIT_POLICY)
    return True


#: What ``[train] device`` accepts (the help of ``--device``).
DEVICE_HELP = "'cpu', 'cuda' (each process uses the GPU of its local rank) or 'cuda:K' (one process)"


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets ``RANK``/``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
