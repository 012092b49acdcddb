"""A run directory: the files of one run, guarded so that a user's hours of training are never lost.

::

    <run_dir>/
        ppl_models-run.json   the marker: this directory is a ppl_models run, and the run's identity
        ppl_models-run.lock   locked (fcntl.flock, exclusive) by the one process writing the directory
        config.toml           the resolved configuration
        checkpoints/, history.json, train.json, metrics.json, eval.nc, *.png

The rules (:class:`RunDir`):

1. Only a directory with the marker is a run directory.  A run never writes into another directory: one that
   does not exist (or is empty) is created atomically — built under a temporary name beside it (marker, lock,
   ``config.toml``) and renamed into place — and any other is refused, naming what it holds.  An empty
   ``run_dir`` (the current directory) is refused.
2. The run's identity (:func:`identity`) is its resolved ``[model]``, ``[guide]``, ``[data]`` and the ``[train]``
   settings that decide what is trained; budgets (``num_epochs``, ``max_steps``, ``time_limit``), display,
   validation and hardware settings (:data:`NOT_IDENTITY`), ``[evaluate]`` and ``[output]`` are not part of it.
3. One writer at a time: a process takes the lock before it reads or writes anything else, without waiting; a
   second process gets one error naming the holder's pid.
4. ``fit`` refuses a run directory that holds checkpoints (``--resume`` continues them); ``--resume`` refuses
   a directory that is not a run, a run whose identity differs (each key, with both values) or one without a
   readable checkpoint.  A refusal writes nothing: the marker and ``config.toml`` are written (:meth:`RunDir.commit`)
   only after every check passed and the checkpoint was loaded.
5. Temporary files an interrupted write left behind (``.<name>.tmp-<pid>``) are removed by the next process that
   takes the lock; a directory it cannot write is one clear error before any work.
6. Clean-up never masks the error that caused it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ppl_models.atomic import atomic_write_bytes
from ppl_models.infer.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    missing_checkpoint_reason,
    newest_checkpoint,
    newest_readable_checkpoint,
)

__all__ = ["MARKER", "LOCK", "FORMAT", "NOT_IDENTITY", "RunDir", "RunDirError", "identity", "identity_differences"]

MARKER = "ppl_models-run.json"
LOCK = "ppl_models-run.lock"
FORMAT = "ppl_models.run/1"

#: Sections whose settings make up a run's identity; of ``[train]`` all but :data:`NOT_IDENTITY`.
IDENTITY_SECTIONS = ("model", "guide", "data", "train")

#: ``[train]`` settings a run may change between ``fit`` and ``--resume``: budgets, display, validation, hardware.
NOT_IDENTITY = ("num_epochs", "max_steps", "time_limit", "budget_clock", "keep_last", "progress", "validate",
                "valid_subset", "valid_every", "device", "fast_path", "threads")

_TMP = re.compile(r"^\..+\.tmp-\d+$")  # ppl_models.atomic's temporary names


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked; the message names the directory and what to do."""


def identity(config) -> Dict[str, dict]:
    """The settings that define a run: ``{section: {key: value}}`` of the resolved config (see the module doc)."""
    raw = config.to_dict()
    out = {section: dict(raw[section]) for section in IDENTITY_SECTIONS}
    for key in NOT_IDENTITY:
        out["train"].pop(key, None)
    return json.loads(json.dumps(out))  # as the marker stores it (tuples become lists)


def identity_differences(recorded: Dict[str, dict], current: Dict[str, dict]) -> List[str]:
    """``"section.key: <recorded> in the run, <current> now"`` for each setting that differs."""
    out = []
    for section in sorted(set(recorded) | set(current)):
        old, new = recorded.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
            if a != b:
                out.append(f"{section}.{key}: {a!r} in the run, {b!r} now")
    return out


def _close_quietly(fd: Optional[int]) -> None:
    if fd is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


class RunDir:
    """The run directory ``path`` (see the module docstring).  Use one per process and command::

        run = RunDir(path)
        try:
            run.open_for_fit(identity(config), resume)   # checks and takes the lock; writes nothing
            ...                                           # load data, build, load the checkpoint
            run.commit(identity(config), to_toml(config))  # marker and config.toml; then train
        finally:
            run.close()
    """

    def __init__(self, path):
        if path is None or not str(path).strip():
            raise RunDirError("run directory: expected a path, received an empty string (it would be the current "
                              "directory, whose files a run must not overwrite)")
        self.path = Path(path)
        self._fd: Optional[int] = None

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def is_run(self) -> bool:
        return self.marker.is_file()

    def read_marker(self) -> dict:
        try:
            marker = json.loads(self.marker.read_text())
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{self.marker} cannot be read ({exc}); the run directory is damaged") from None
        if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("identity"), dict):
            raise RunDirError(f"{self.marker}: expected a {FORMAT!r} marker with the run's identity")
        return marker

    # ---------------------------------------------------------------------------------------------- fit
    def open_for_fit(self, ident: Dict[str, dict], resume: bool) -> "RunDir":
        """Check that ``fit`` (or ``fit --resume``) may use this directory, taking its lock if it is a run.
        Refusals raise :class:`RunDirError` and write nothing (the lock is taken on the run's lock file; the pid
        goes into it only in :meth:`claim`)."""
        path = self.path
        if not path.exists():
            if resume:
                raise RunDirError(f"cannot resume {path}: the directory does not exist")
            return self  # created by commit()
        if not path.is_dir():
            raise RunDirError(f"run directory {path} exists and is not a directory")
        if not self.is_run():
            what = f"it is not a ppl_models run directory (no {MARKER})"
            if resume:
                raise RunDirError(f"cannot resume {path}: {what}")
            held = sorted(os.listdir(path))
            if held:
                shown = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "")
                raise RunDirError(f"{path} holds files a run did not create ({shown}) and {what}: a run never "
                                  "overwrites them; choose a new or empty run directory")
            return self  # empty: replaced by the new run directory in commit()
        self._lock()
        changed = identity_differences(self.read_marker()["identity"], ident)
        found = list_checkpoints(self.checkpoints)
        if resume:
            if changed:
                raise RunDirError(f"cannot resume {path}: the configuration differs from the run's: " + "; ".join(changed))
            if newest_readable_checkpoint(self.checkpoints)[0] is None:
                raise RunDirError(f"cannot resume {path}: no readable checkpoint: "
                                  f"{missing_checkpoint_reason(self.checkpoints)}; nothing was changed")
        elif found:
            other = f"; its configuration differs: {'; '.join(changed)}" if changed else ""
            raise RunDirError(f"{path} already holds a run (checkpoints up to {found[-1].name}){other}: continue it "
                              "with --resume, or choose another run directory")
        self._check_writable()
        return self

    def commit(self, ident: Dict[str, dict], config_text: str) -> None:
        """Write the marker and ``config.toml``: a new run directory is created atomically (and locked), an
        existing run's files are replaced atomically; orphaned temporary files are removed."""
        marker = json.dumps({"format": FORMAT, "identity": ident,
                             "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds")},
                            indent=1).encode()
        if self._fd is not None:
            self.claim()
            try:
                atomic_write_bytes(self.marker, lambda f: f.write(marker))
                atomic_write_bytes(self.path / "config.toml", lambda f: f.write(config_text.encode()))
            except OSError as exc:
                raise RunDirError(f"cannot write run directory {self.path}: {exc}") from None
            return
        self._create(marker, config_text)

    def _create(self, marker: bytes, config_text: str) -> None:
        parent, name = self.path.parent, self.path.name
        tmp = parent / f".{name}.tmp-{os.getpid()}"
        fd = None
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._remove_orphan_dirs(parent, name)
            shutil.rmtree(tmp, ignore_errors=True)  # this pid's own name: a leftover of a process long gone
            tmp.mkdir()
            fd = self._lock_file(tmp / LOCK)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            (tmp / MARKER).write_bytes(marker)
            (tmp / "config.toml").write_text(config_text)
            os.rename(tmp, self.path)  # atomic; replaces an empty directory, fails on a non-empty one
        except (OSError, RunDirError) as exc:
            _close_quietly(fd)
            shutil.rmtree(tmp, ignore_errors=True)  # the clean-up never masks the error
            if isinstance(exc, RunDirError):
                raise
            if self.path.is_dir() and os.listdir(self.path):
                raise RunDirError(f"{self.path} was created by another process meanwhile; choose another run "
                                  "directory") from None
            raise RunDirError(f"cannot create run directory {self.path}: {exc}") from None
        self._fd = fd

    # ------------------------------------------------------------------------------------------ evaluate
    def open_for_evaluate(self) -> "RunDir":
        """Check that the directory is a run and writable, and take its lock (``evaluate`` writes metrics.json)."""
        if not self.is_run():
            raise RunDirError(f"{self.path} is not a run directory: no {MARKER} (runs are made by ppl-models fit)")
        self._lock()
        self._check_writable()
        return self

    def claim(self) -> None:
        """The checks passed and this process starts writing: record its pid in the lock file (for another
        process's refusal message) and remove orphaned temporary files.  Before this, nothing was written."""
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for a message
        self._remove_orphans()

    def checkpoint_to_evaluate(self, given=None) -> Tuple[Path, dict]:
        """``given`` (a path, or a file name in ``checkpoints/``) or else the newest checkpoint, which must be
        readable (:func:`~ppl_models.infer.checkpoint.newest_checkpoint`), and its state."""
        if given is None:
            return newest_checkpoint(self.checkpoints)
        path = Path(given)
        if not path.is_file() and (self.checkpoints / path.name).is_file():
            path = self.checkpoints / path.name
        if not path.is_file():
            names = ", ".join(p.name for p in list_checkpoints(self.checkpoints)) or "none"
            raise CheckpointError(f"checkpoint {given}: no such file (checkpoints of {self.path}: {names})")
        return path, load_checkpoint(path)

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory when inside it (as metrics.json records it)."""
        try:
            return str(Path(path).resolve().relative_to(self.path.resolve()))
        except ValueError:
            return str(Path(path).resolve())

    def record_evaluated(self, checkpoint: Path, step: int) -> None:
        """Add the evaluated checkpoint and its step to ``metrics.json`` (for evaluations that write their own)."""
        path = self.path / "metrics.json"
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        metrics.update(checkpoint=self.relative(checkpoint), checkpoint_step=int(step))
        text = json.dumps(metrics, indent=2) + "\n"
        atomic_write_bytes(path, lambda f: f.write(text.encode()))

    # --------------------------------------------------------------------------------------------- parts
    def close(self) -> None:
        """Release the lock (the lock file stays: removing it would let two processes lock two files)."""
        fd, self._fd = self._fd, None
        _close_quietly(fd)

    def _lock(self) -> None:
        if self._fd is None:
            self._fd = self._lock_file(self.path / LOCK)

    def _lock_file(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"run directory {path.parent} is not writable: cannot open its lock file ({exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            _close_quietly(fd)
            raise RunDirError(f"run directory {path.parent} is in use by another process (pid {holder}, which holds "
                              f"{path}): wait for it to finish, or choose another run directory") from None
        return fd

    def _check_writable(self) -> None:
        """Create and remove a probe file in the directory and its checkpoints/, so that a read-only run directory
        is one error now, not after the work."""
        for folder in (self.path, self.checkpoints):
            if not folder.is_dir():
                continue
            probe = folder / f".write-probe.tmp-{os.getpid()}"
            try:
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
                os.unlink(probe)
            except OSError as exc:
                raise RunDirError(f"run directory {folder} is not writable ({exc.strerror or exc}): a run writes its "
                                  "checkpoints and results there") from None

    def _remove_orphans(self) -> None:
        """Remove temporary files (``.<name>.tmp-<pid>``) an interrupted write left (the lock is held: no other
        process of ours writes here now)."""
        removed = []
        for folder in (self.path, self.checkpoints):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if _TMP.match(entry.name) and entry.is_file():
                    try:
                        entry.unlink()
                        removed.append(entry.name)
                    except OSError:
                        pass
        if removed:
            print(f"note: removed {len(removed)} temporary file(s) an interrupted write left in {self.path}: "
                  + ", ".join(sorted(removed)), file=sys.stderr)

    @staticmethod
    def _remove_orphan_dirs(parent: Path, name: str) -> None:
        """Remove half-built run directories ``.<name>.tmp-<pid>`` of a creation that was interrupted (a lock
        still held means that creation is under way)."""
        for entry in parent.glob(f".{name}.tmp-*"):
            if not (entry / MARKER).is_file():  # the marker is written after the lock is taken
                continue
            try:
                fd = os.open(entry / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            shutil.rmtree(entry, ignore_errors=True)
            _close_quietly(fd)
