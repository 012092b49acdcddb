"""Atomic, pickle-free training checkpoints.

A checkpoint is a ``torch.save`` of plain containers and tensors only, so it
loads with ``torch.load(weights_only=True)`` — loading never executes pickled
code.  It is written to a temporary file in the same directory, flushed and
``fsync``-ed, then renamed over its final name: a crash or a signal during the
write leaves the previous checkpoints untouched.

Contents: parameters (the Pyro param store's unconstrained values), optimizer
state, every random-number-generator state (torch, Python, NumPy and the
engine's data generator), the position (epoch, batch within the epoch, global
step), the epoch's permutation of the data, the training history, and the names of the checkpoints the run
has written (``checkpoints``, oldest first: its own write history).

Rotation (:func:`save_checkpoint`) goes by that history, not by the step numbers found in the directory: the
run keeps its newest ``keep_last`` checkpoints (``keep_last = 0`` keeps all; a negative value is refused),
never deletes the one it just wrote, and never deletes a file it did not write.  A file in the right format
that lacks keys of the state (:data:`REQUIRED_KEYS`) is refused with a :class:`CheckpointError` naming them.
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
    "REQUIRED_KEYS",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "newest_readable_checkpoint",
    "newest_checkpoint",
    "missing_checkpoint_reason",
    "set_aside_newer",
    "check_keep_last",
    "rotation",
    "checkpoint_step",
    "state_to_cpu",
    "copy_optimizer_state",
    "capture_rng_state",
    "restore_rng_state",
    "atomic_write_bytes",
]

FORMAT = "ppl_models.checkpoint/1"
_NAME = re.compile(r"^step-(\d{9})\.pt$")

#: Keys of the engine's state that every checkpoint holds (besides ``format``; ``checkpoints``, the run's write
#: history, and ``distributed`` are optional).
REQUIRED_KEYS = ("settings", "step", "epoch", "batch_in_epoch", "params", "optimizer", "rng", "generator", "perm",
                 "history", "partial")


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


def check_keep_last(keep_last) -> int:
    """``keep_last``: how many of the run's newest checkpoints stay on disk, an integer >= 1, or 0 for all."""
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 0:
        raise ValueError(f"keep_last: expected an integer >= 1 (checkpoints kept) or 0 (keep all), received {keep_last!r}")
    return keep_last


def save_checkpoint(directory: Path, state: dict, *, keep_last: int = 2) -> Tuple[Path, List[str]]:
    """Write ``state`` atomically as ``directory/step-<step>.pt``, then rotate by the run's own write history.

    ``state["checkpoints"]`` (optional): names of the checkpoints the run wrote before, oldest first.  The new
    file's name is appended (the file stores that history, so a resumed run continues it); of that history
    the newest ``keep_last`` stay (``0``: all) and the older ones are deleted.  Files the history does not
    name (another run's, a set-aside unreadable one) are never touched, nor is the file just written.

    :return: the path written and the history still on disk, oldest first (the run's next ``checkpoints``).
    """
    path = checkpoint_path(directory, int(state["step"]))
    history, drop = rotation(state.get("checkpoints", ()), path.name, keep_last)
    state = {"format": FORMAT, **state, "checkpoints": history}  # a crash before the deletions: the next rotation
    atomic_write_bytes(path, lambda f: torch.save(state, f))  # deletes them
    for name in drop:
        try:
            (Path(directory) / name).unlink(missing_ok=True)
        except OSError as exc:  # clean-up: the checkpoint was written; say so, do not fail the run
            print(f"note: could not delete old checkpoint {Path(directory) / name}: {exc}", file=sys.stderr)
    return path, history[len(drop):]


def rotation(written, name: str, keep_last: int) -> Tuple[List[str], List[str]]:
    """The write history after writing checkpoint ``name`` (``written`` + ``name``, oldest first) and the names
    of it to delete: all but the newest ``keep_last`` (none for ``keep_last = 0``); never ``name`` itself."""
    check_keep_last(keep_last)
    history = [n for n in written if n != name] + [name]
    return history, (history[:-keep_last] if keep_last else [])


def checkpoint_step(path: Path) -> Optional[int]:
    """The step in a checkpoint's file name ``step-<step>.pt`` (``None`` for another name)."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint without executing pickled code (``weights_only=True``)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupted, or not a checkpoint
        reason = " ".join(str(exc).split())  # one line (torch's messages span several)
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {reason}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path}: expected format {FORMAT!r}, received {found!r}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path}: in format {FORMAT!r} but missing the key(s) {', '.join(map(repr, missing))} "
            "(not written by this package's engine, or damaged)"
        )
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


def missing_checkpoint_reason(directory: Path) -> str:
    """Why ``directory`` has no readable checkpoint, in words (for a refusal): it does not exist, it holds no
    ``step-*.pt`` file, or each file's reason."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} does not exist (the run was stopped before its first checkpoint)"
    found = list_checkpoints(directory)
    if not found:
        return f"{directory} holds no checkpoint file (step-*.pt; the run was stopped before its first checkpoint)"
    reasons = []
    for path in found:
        try:
            load_checkpoint(path)
        except CheckpointError as exc:
            reasons.append(str(exc))
    return f"none of the {len(found)} checkpoint file(s) in {directory} can be read: " + "; ".join(reasons)


def newest_checkpoint(directory: Path) -> Tuple[Path, dict]:
    """The newest checkpoint of ``directory`` and its state; it must be readable: a damaged newest checkpoint is
    refused (naming the readable older ones), never silently replaced by an older one."""
    directory = Path(directory)
    found = list_checkpoints(directory)
    if not found:
        raise CheckpointError(f"no checkpoint: {missing_checkpoint_reason(directory)}")
    try:
        return found[-1], load_checkpoint(found[-1])
    except CheckpointError as exc:
        older = [p.name for p in found[:-1]]
        hint = f" (older ones: {', '.join(older)})" if older else ""
        raise CheckpointError(f"the newest checkpoint is damaged: {exc}; name the checkpoint to use with "
                              f"--checkpoint PATH{hint}") from None


def set_aside_newer(directory: Path, path: Path) -> List[Path]:
    """Rename the checkpoint files of ``directory`` with a step above ``path``'s (unreadable ones a resume
    skipped) to ``<name>.unreadable``, so that the run's newest checkpoint is again the one of the highest step.
    Returns the new paths; nothing is deleted."""
    step = checkpoint_step(path)
    moved = []
    for other in list_checkpoints(directory):
        if step is not None and checkpoint_step(other) > step:
            target = other.with_name(other.name + ".unreadable")
            other.replace(target)
            moved.append(target)
    return moved


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
