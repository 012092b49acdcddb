"""Atomic, pickle-free training checkpoints.

A checkpoint is a ``torch.save`` of plain containers and tensors only, so it
loads with ``torch.load(weights_only=True)`` — loading never executes pickled
code.  It is written to a temporary file in the same directory, flushed and
``fsync``-ed, then renamed over its final name: a crash or a signal during the
write leaves the previous checkpoints untouched.

Contents: parameters (the Pyro param store's unconstrained values), optimizer
state, every random-number-generator state (torch, Python, NumPy and the
engine's data generator), the position (epoch, batch within the epoch, global
step), the epoch's permutation of the data, and the training history.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ppl_models.atomic import atomic_write_bytes

__all__ = [
    "FORMAT",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "newest_readable_checkpoint",
    "state_to_cpu",
    "copy_optimizer_state",
    "capture_rng_state",
    "restore_rng_state",
    "atomic_write_bytes",
]

FORMAT = "ppl_models.checkpoint/1"
_NAME = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run."""


def capture_rng_state() -> dict:
    """Global RNG states (torch, Python ``random``, NumPy) as pickle-free containers."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": {
            "name": np_state[0],
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:09d}.pt"


def save_checkpoint(directory: Path, state: dict, *, keep_last: int = 2) -> Path:
    """Write ``state`` atomically as ``directory/step-<step>.pt``; keep the newest ``keep_last`` files."""
    state = {"format": FORMAT, **state}
    path = checkpoint_path(directory, int(state["step"]))
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    if keep_last:
        for old in list_checkpoints(directory)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint without executing pickled code (``weights_only=True``)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupted, or not a checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path}: expected format {FORMAT!r}, received {found!r}")
    return state


def list_checkpoints(directory: Path) -> List[Path]:
    """Checkpoint files in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def newest_readable_checkpoint(directory: Path, *, report: bool = False) -> Tuple[Optional[Path], Optional[dict]]:
    """The newest readable checkpoint in ``directory`` and its state, or ``(None, None)``; unreadable ones are
    skipped (and, with ``report``, named on stderr)."""
    for path in reversed(list_checkpoints(directory)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            if report:
                print(f"skipping unreadable checkpoint: {exc}", file=sys.stderr)
            continue
        return path, state
    return None, None


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest readable checkpoint in ``directory`` (unreadable ones are skipped), or ``None``."""
    return newest_readable_checkpoint(directory)[0]


def state_to_cpu(obj):
    """``obj`` (a state: tensors in dicts, lists and tuples) with every tensor detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: state_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(state_to_cpu(v) for v in obj)
    return obj


def copy_optimizer_state(state: dict) -> dict:
    """A copy of an optimizer state dict deep enough to replace per-parameter tensors."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict) and "state" in value:
            out[key] = {**value, "state": {k: dict(v) for k, v in value["state"].items()}}
        else:
            out[key] = value
    return out
