"""The process's runtime environment, read without importing torch: whether a launcher started this process.

This module imports neither torch nor Pyro, so the command line can use it before it parses its arguments.
How many threads a run uses is the engine's choice (:mod:`ppl_models.infer.threads`).
"""

from __future__ import annotations

import os

__all__ = ["DEVICE_HELP", "in_torchrun"]

#: What ``[train] device`` accepts (the help of ``--device``).
DEVICE_HELP = "'cpu', 'cuda' (each process uses the GPU of its local rank) or 'cuda:K' (one process)"


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets ``RANK``/``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
