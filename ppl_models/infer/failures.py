"""What stops or diagnoses a run: non-finite losses (which site, which data rows) and SIGINT/SIGTERM.

Used by the engine (:mod:`ppl_models.infer.engine`) and the evaluator; each function re-runs or inspects the
batch it is given and never changes training state.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import pyro
import pyro.poutine as poutine
import torch

from ppl_models.infer.estimators import trace_plate_depth
from ppl_models.spec import ShapeError

__all__ = ["NonFiniteLossError", "TrainingInterrupted", "data_rows_named", "non_finite_rows", "catch_signals",
           "find_non_finite_site", "plate_depth"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step, the site and any bad parameter."""

    def __init__(self, message: str, *, step: int, site: Optional[str], checkpoint: Optional[Path]):
        super().__init__(message)
        self.step, self.site, self.checkpoint = step, site, checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a checkpoint was written before stopping."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]):
        name = signal.Signals(signum).name
        where = f"checkpoint written to {checkpoint}" if checkpoint else "no run directory, nothing saved"
        super().__init__(f"training interrupted by {name} after step {step}; {where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@contextmanager
def data_rows_named(args, idx, what: str = "training data"):
    """A :class:`ShapeError` raised inside names the dataset rows (``idx``) holding non-finite values of the batch
    ``args``, not only the row within the batch that the model's check reports."""
    try:
        yield
    except ShapeError as exc:
        rows = non_finite_rows(args, idx, what)
        if not rows:
            raise
        raise ShapeError(f"{exc} (within the batch); {rows}") from None


def non_finite_rows(args, idx, what: str = "training data") -> str:
    """``"<what> row(s) with non-finite values: i, j"``: the rows ``idx`` of the data set whose values in the batch
    ``args`` are NaN or infinite (``""`` when there are none)."""
    if idx is None or not isinstance(idx, torch.Tensor) or idx.dim() != 1:
        return ""
    n = int(idx.shape[0])
    bad = torch.zeros(n, dtype=torch.bool)
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() >= 1 and a.shape[0] == n:
            bad |= ~torch.isfinite(a.detach().reshape(n, -1)).all(1).cpu()
    rows = idx.cpu()[bad].tolist()
    if not rows:
        return ""
    return f"{what} row(s) with non-finite values: " + ", ".join(map(str, rows[:10])) + (
        f" and {len(rows) - 10} more" if len(rows) > 10 else "")


def plate_depth(model, guide, args, idx, kwargs) -> int:
    """How many plates the model and guide nest (what Pyro would otherwise guess and log)."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, idx, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, idx, **kwargs)
    return trace_plate_depth(guide_trace, model_trace)


def find_non_finite_site(model, guide, args, idx, kwargs):
    """Re-run guide and model on the batch; name the first site whose value or log-density is not finite."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
        try:
            guide_trace = poutine.trace(guide).get_trace(*args, idx, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, idx, **kwargs)
        except Exception as exc:  # the diagnosis must not hide the original error
            return None, f"re-running model and guide failed: {type(exc).__name__}: {exc}"
        for who, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                value = site["value"]
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    return name, f"site {name!r} ({who}) has a non-finite value"
                log_prob = site["fn"].log_prob(value)
                if not bool(torch.isfinite(log_prob).all()):
                    bad = log_prob[~torch.isfinite(log_prob)].flatten()[0].item()
                    return name, f"site {name!r} ({who}) has log-density {bad}"
    return None, ""


class _Caught:
    signum: Optional[int] = None


@contextmanager
def catch_signals():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""
    caught = _Caught()
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum, frame):
        if caught.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        caught.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
