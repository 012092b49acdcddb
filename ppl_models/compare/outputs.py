"""The files a comparison writes, listed in the run directory's ``manifest.json`` as they are written
(:class:`RunOutputs`).

A comparison run again into the same directory with another configuration would otherwise leave the previous
run's files beside the new ones — ``idata/*.nc`` of problems no longer compared, a ``loo.csv`` of a Bayesian GMM
that was not run, plots of other estimators — and nothing would tell them apart.  So a run starts by removing
every file that the previous run's manifest lists (and only those: nothing else in the directory is touched),
lists its own files as it writes them, and at the end names on stderr the previous files it did not write again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

from ppl_models.atomic import atomic_write_bytes

__all__ = ["MANIFEST", "RunOutputs"]

#: The manifest's file name in the run directory.
MANIFEST = "manifest.json"


class RunOutputs:
    """The comparison's files in ``run_dir``, recorded in :data:`MANIFEST` (paths relative to ``run_dir``)."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.files: List[str] = []  # written by this run
        self.removed: List[str] = []  # the previous run's, removed by remove_previous

    def previous(self) -> List[Path]:
        """The files that the manifest of a previous run lists and that still exist (inside ``run_dir`` only).

        :raises ValueError: the manifest is not one this module wrote (naming the file).
        """
        path = self.run_dir / MANIFEST
        if not path.is_file():
            return []
        try:
            listed = json.loads(path.read_text())["files"]
            if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
                raise TypeError("'files' must be a list of file names")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a comparison's manifest ({exc}); remove it or choose another run "
                             "directory") from None
        root = self.run_dir.resolve()
        out = []
        for name in listed:
            file = (self.run_dir / name).resolve()
            if file.is_relative_to(root) and file != root / MANIFEST and file.is_file():
                out.append(file)
        return out

    def remove_previous(self) -> List[Path]:
        """Remove the previous run's files (:meth:`previous`), saying so on stderr, and start an empty manifest."""
        stale = self.previous()
        for file in stale:
            file.unlink()
        idata = self.run_dir / "idata"
        if idata.is_dir() and not any(idata.iterdir()):
            idata.rmdir()
        self.removed = [f.relative_to(self.run_dir.resolve()).as_posix() for f in stale]
        if stale:
            print(f"compare: removed the {len(stale)} files of the previous comparison in {self.run_dir} (its "
                  f"{MANIFEST}); this run writes its own", file=sys.stderr, flush=True)
        self._save()
        return stale

    def not_rewritten(self) -> List[str]:
        """The previous run's files that this run has not written again (after :meth:`remove_previous`), with one
        line on stderr naming them: results of another configuration, gone rather than left beside these."""
        gone = [name for name in self.removed if name not in self.files]
        if gone:
            shown = ", ".join(gone[:10]) + (f" and {len(gone) - 10} more" if len(gone) > 10 else "")
            print(f"compare: {len(gone)} files of the previous comparison were not written again (another "
                  f"configuration) and are gone: {shown}", file=sys.stderr, flush=True)
        return gone

    def record(self, path) -> Path:
        """Add ``path`` (a file just written in ``run_dir``) to the manifest; return it."""
        name = Path(path).resolve().relative_to(self.run_dir.resolve()).as_posix()
        if name not in self.files:
            self.files.append(name)
            self._save()
        return Path(path)

    def _save(self) -> None:
        text = json.dumps({"written_by": "ppl-models compare", "files": self.files}, indent=1) + "\n"
        atomic_write_bytes(self.run_dir / MANIFEST, lambda f: f.write(text.encode()))
