"""How many threads a training run uses: all of them on an idle machine, one when other processes compete.

torch runs its CPU kernels on an OpenMP pool of one thread per core.  When other processes compete for the
cores, OpenMP's waiting threads spin through the time slices their partners need, and each parallel region
waits for its slowest thread: measured on this project's 2-core machine beside three busy processes
(``benchmarks/bench_threads.py``), the main job's step ran at 0.25-0.29 x its one-thread speed with two
threads.  ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once) removes that collapse but costs 25-30 % on an idle
machine (0.71-0.76 x one thread), so the package does not set it.  Instead the engine measures:

:class:`ThreadTuner` (``[train] threads = "auto"``, the default) times, every ``interval`` seconds of
training, ``probe_steps`` steps at each candidate thread count (one, and all of torch's) in interleaved blocks
(1, all, 1, all), and trains with the count of the smaller median step time until the next probe.  The first
probe waits ``warmup_steps`` steps: a run's first steps (loading compiled kernels, filling caches) are slower
than the rest, and a probe that timed them once chose two threads under a load where one ran 2.3x faster.
The cost is a few steps at the slower setting per interval; the gain under load is up to 4x.
``threads = N`` fixes N threads for the run; torch's own setting is restored when ``fit`` returns. The thread count
changes no arithmetic in the package's models (steps with one and two threads gave bit-identical parameters), but a
model whose large reductions torch splits over threads could differ in the last bits: fix ``threads`` for
bit-for-bit reproducibility across machines.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

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
    :param probe_steps: steps timed at each candidate, split over ``rounds`` blocks (the first step after a
        switch is not counted unless ``skip_first`` is false).
    :param warmup_steps: steps trained with all threads before the first probe.
    :param rounds: blocks per candidate in a probe (interleaved); ``probe_steps`` is split between them.
    :param skip_first: leave the first step after a switch untimed (right for short steps; an evaluator's
        seconds-long batches need not pay for it).
    :param margin: more threads must be this many times faster to be chosen (timings under load are noisy, and
        a wrong choice of more threads costs far more than a wrong choice of fewer); once more threads run,
        fewer must be faster to replace them (measured on the idle machine: one probe in five saw two-thread
        steps slowed to within 3 % of one thread's, and switched for 30 s to a count 1.6x slower).
    :param clock: the wall clock (a real one: the tuner measures speed).
    """

    def __init__(self, threads="auto", *, interval: float = 30.0, probe_steps: int = 16, margin: float = 1.1,
                 warmup_steps: int = 20, rounds: int = 2, skip_first: bool = True,
                 clock: Callable[[], float] = time.perf_counter):
        check_threads(threads)
        self.threads, self.interval, self.probe_steps, self.clock = threads, interval, probe_steps, clock
        self.margin, self.warmup_steps, self.rounds, self.skip_first = margin, warmup_steps, rounds, skip_first
        self._saved: Optional[int] = None
        self.candidates: List[int] = []
        self.current = 0
        self.switches = 0
        self.chosen: Optional[int] = None  # the last probe's choice
        self._probing: List[int] = []  # candidates still to time in this probe
        self._times: Dict[int, List[float]] = {}
        self._count = 0
        self._steps = 0
        self._skip = False
        self._next_probe = 0.0

    def __enter__(self) -> "ThreadTuner":
        self._saved = torch.get_num_threads()
        if self.threads != "auto":
            self.candidates = [self.threads]
        else:
            self.candidates = sorted({1, self._saved})
        self._set(self.candidates[-1])
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            torch.set_num_threads(self._saved)

    @property
    def active(self) -> bool:
        return len(self.candidates) > 1

    def summary(self) -> dict:
        """What the run used: the thread count of the last probe's choice (else the count now), the candidates
        and how often it switched."""
        return {"threads": self.current if self.chosen is None else self.chosen, "candidates": list(self.candidates),
                "switches": self.switches, "policy": self.threads}

    def _set(self, n: int) -> None:
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n

    def _start_probe(self) -> None:
        self._probing = list(self.candidates) * self.rounds  # interleaved: a drift of the load hits every count
        self._times = {n: [] for n in self.candidates}
        self._begin_candidate()

    def _begin_candidate(self) -> None:
        self._set(self._probing[0])
        self._count, self._skip = 0, self.skip_first

    def after_step(self, seconds: float) -> None:
        """Record one step's wall time; switch threads when a probe says so."""
        if not self.active:
            return
        self._steps += 1
        if not self._probing:
            if self._steps >= self.warmup_steps and self.clock() >= self._next_probe:
                self._start_probe()
            return
        if self._skip:  # the first step after a switch wakes the pool
            self._skip = False
            return
        self._times[self.current].append(seconds)
        self._count += 1
        if self._count < -(-self.probe_steps // self.rounds):
            return
        self._probing.pop(0)
        if self._probing:
            self._begin_candidate()
            return
        median = {n: statistics.median(t) for n, t in self._times.items()}
        best = min(median, key=lambda n: median[n] * (self.margin if n > min(median) else 1.0))
        if self.chosen is not None and best < self.chosen and median[best] >= median[self.chosen]:
            best = self.chosen  # fewer threads within the margin but not faster: keep the count that runs now
        self.switches += int(self.chosen is not None and best != self.chosen)
        self.chosen = best
        self._set(best)
        self._next_probe = self.clock() + self.interval
