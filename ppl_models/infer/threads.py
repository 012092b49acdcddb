"""How many threads a training run uses: all of them on an idle machine, one when other processes compete.

torch runs its CPU kernels on an OpenMP pool of one thread per core.  When other processes compete for the
cores, OpenMP's waiting threads spin through the time slices their partners need, and each parallel region
waits for its slowest thread: measured on this project's 2-core machine beside three busy processes
(``benchmarks/bench_threads.py``), the main job's step ran at 0.25-0.29 x its one-thread speed with two
threads.  ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once) removes that collapse but costs 25-30 % on an idle
machine (0.71-0.76 x one thread), so the package does not set it.  Instead the engine measures:

:class:`ThreadTuner` (``[train] threads = "auto"``, the default) alternates, every ``interval`` seconds of
training, ``probe_steps`` steps at each candidate thread count (one, and all of torch's), and trains with the
faster until the next probe.  The cost is a few steps at the slower setting per interval; the gain under load
is up to 4x.  ``threads = N`` fixes N threads for the run; torch's own setting is restored when ``fit``
returns.  The thread count changes no arithmetic in the package's models (steps with one and two threads gave
bit-identical parameters), but a model whose large reductions torch splits over threads could differ in the
last bits: fix ``threads`` for bit-for-bit reproducibility across machines.
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional

import torch

__all__ = ["ThreadTuner", "check_threads"]


def check_threads(threads) -> None:
    """``threads``: ``"auto"`` or a positive integer; anything else is one error naming the setting."""
    if threads == "auto":
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected \"auto\" or a positive integer, received {threads!r}")


class ThreadTuner:
    """Chooses torch's intra-op thread count while training (module docstring).

    Use as a context manager around the training loop and call :meth:`after_step` with each step's wall time.

    :param threads: ``"auto"`` or a fixed positive number of threads.
    :param interval: seconds of training between probes.
    :param probe_steps: steps timed at each candidate (the first step after a switch is not counted).
    :param margin: more threads must be this many times faster to be chosen (timings under load are noisy, and
        a wrong choice of more threads costs far more than a wrong choice of fewer).
    :param clock: the wall clock (a real one: the tuner measures speed).
    """

    def __init__(self, threads="auto", *, interval: float = 30.0, probe_steps: int = 16, margin: float = 1.1,
                 clock: Callable[[], float] = time.perf_counter):
        check_threads(threads)
        self.threads, self.interval, self.probe_steps, self.clock = threads, interval, probe_steps, clock
        self.margin = margin
        self._saved: Optional[int] = None
        self.candidates: List[int] = []
        self.current = 0
        self.switches = 0
        self.chosen: Optional[int] = None  # the last probe's choice
        self._probing: List[int] = []  # candidates still to time in this probe
        self._times: dict = {}
        self._count = 0
        self._skip = False
        self._next_probe = 0.0

    def __enter__(self) -> "ThreadTuner":
        self._saved = torch.get_num_threads()
        if self.threads != "auto":
            self.candidates = [self.threads]
        else:
            self.candidates = sorted({1, self._saved})
        self._set(self.candidates[-1])
        if len(self.candidates) > 1:
            self._start_probe()
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            torch.set_num_threads(self._saved)

    @property
    def active(self) -> bool:
        return len(self.candidates) > 1

    def summary(self) -> dict:
        """What the run used: the thread count now, the candidates and how often it switched."""
        return {"threads": self.current, "candidates": list(self.candidates), "switches": self.switches,
                "policy": self.threads}

    def _set(self, n: int) -> None:
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n

    def _start_probe(self) -> None:
        self._probing = list(self.candidates)
        self._times = {}
        self._begin_candidate()

    def _begin_candidate(self) -> None:
        self._set(self._probing[0])
        self._count, self._skip = 0, True
        self._times[self.current] = 0.0

    def after_step(self, seconds: float) -> None:
        """Record one step's wall time; switch threads when a probe says so."""
        if not self.active:
            return
        if not self._probing:
            if self.clock() >= self._next_probe:
                self._start_probe()
            return
        if self._skip:  # the first step after a switch wakes the pool
            self._skip = False
            return
        self._times[self.current] += seconds
        self._count += 1
        if self._count < self.probe_steps:
            return
        self._probing.pop(0)
        if self._probing:
            self._begin_candidate()
            return
        best = min(self._times, key=lambda n: self._times[n] * (self.margin if n > min(self._times) else 1.0))
        self.switches += int(self.chosen is not None and best != self.chosen)
        self.chosen = best
        self._set(best)
        self._next_probe = self.clock() + self.interval
