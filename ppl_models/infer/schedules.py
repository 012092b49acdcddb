r"""Learning-rate schedules over a run's length in steps or in seconds, and the run's training clock.

Notation, at the optimizer step that follows :math:`s` steps (:math:`s = 0` at the first step of the run):

* :math:`S`: the run's length in steps — ``max_steps``, else ``num_epochs`` × batches per epoch (the smaller
  of the two when both are set);
* :math:`t`: the run's training seconds before this step (:class:`RunClock`: from its first training step,
  summed over resumed calls, without set-up and compile), and :math:`T` the ``time_limit``.

The run's **progress** before step :math:`s` is the fraction done by whichever bound ends it first,

.. math::  p_s = \min\bigl(1, \max(s / S,\; t / T)\bigr)   \qquad (\text{the } t/T \text{ term only with a time limit}),

so a budgeted run (a ``time_limit`` and an epoch count it will not reach) anneals by the end of its budget.
The learning rate of every parameter group (dense and sparse alike) at step :math:`s` is

.. math::  \mathrm{lr}_s = \mathrm{lr} \cdot w_s \cdot d(p_s), \qquad \rho = \mathrm{lr\_final} / \mathrm{lr}
           \ (\text{default } 0.1),

with the decay :math:`d` of the schedule:

* ``"constant"``: :math:`d(p) = 1`;
* ``"step"`` — Burda, Grosse & Salakhutdinov (2016)'s schedule over any run length: 8 stages
  :math:`i = 0, \dots, 7` whose lengths grow as :math:`3^i`; stage :math:`i` spans
  :math:`p \in [b_i, b_{i+1})` with :math:`b_i = (3^i - 1) / (3^8 - 1)`, and :math:`d = \rho^{i/7}`.  With
  :math:`\rho = 0.1` and a run of :math:`3^8 - 1 = 6560` half-epochs (3280 epochs) this is exactly theirs:
  :math:`3^i` epochs at :math:`10^{-i/7} \cdot \mathrm{lr}`, from :math:`10^{-3}` down to :math:`10^{-4}`.  Stage
  boundaries in steps are exact (integer comparisons :math:`s (3^8 - 1) \ge (3^i - 1) S`);
* ``"cosine"``: :math:`d(p) = \rho + (1 - \rho) (1 + \cos \pi p) / 2` — from lr down to lr_final at :math:`p = 1`;
* ``"plateau"`` — halving on a validation plateau (Deng et al. 2018's protocol): :math:`d = 2^{-k}`, :math:`k` the
  number of validations so far whose score was not better than the best before them (:func:`plateau_halvings`),
  so the factor is a function of the run's validation history (which the checkpoint holds) rather than of
  :math:`p`; the engine supplies :math:`k` (``halvings``).  With it, ``early_stopping`` = :math:`E` stops a run
  once :math:`E` validations in a row were not better than the best (:func:`validations_since_best`);

and the linear **warm-up** :math:`w_s` (``warmup``):

* ``0``: :math:`w_s = 1`;
* a whole number :math:`W \ge 1` of steps: :math:`w_s = \min(1, (s + 1) / W)` — :math:`1/W` at the first step,
  exactly 1 from step :math:`W - 1` on;
* a fraction :math:`0 < f < 1` of the run: :math:`w_s = \min(1, q_s / f)` with
  :math:`q_s = \max((s + 1) / S,\; t / T)` (the step count at the end of the step, as above), so
  :math:`w_s = \min(1, (s + 1) / (f S))` in a run bounded by steps.

Warm-up multiplies the decay: a warmed-up "cosine" run starts its cosine at step 0, not after the warm-up.
:class:`~ppl_models.infer.optim.Optimizer` applies :math:`w_s d(p_s)` as a factor on each group's lr during its
step (the groups keep their base lr, so a strategy that sets a group's lr itself still gets the factor), and the
factor is a function of :math:`s` and :math:`t` alone: a checkpoint holds :math:`s` and :math:`t`, so a resumed
run continues the schedule where it stopped (bit-identically when the schedule is defined in steps).

References:
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders (section 5: "for i = 0 … 7 …
    3^i epochs with learning rate 0.001 · 10^{-i/7}").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ppl_models.registry import UnknownNameError

__all__ = ["LR_SCHEDULES", "STEP_STAGES", "PLATEAU_FACTOR", "LRSchedule", "make_lr_schedule", "plateau_halvings",
           "validations_since_best", "RunClock", "BUDGET_CLOCKS", "validation_rows"]

LR_SCHEDULES = ("constant", "step", "cosine", "plateau")
#: ``"plateau"``: the factor on the learning rate at each validation that is not better than the best before it.
PLATEAU_FACTOR = 0.5
#: ``"step"``: number of stages (Burda et al.: i = 0 … 7) and the growth of their lengths (3^i).
STEP_STAGES, STEP_GROWTH = 8, 3
_STEP_TOTAL = STEP_GROWTH**STEP_STAGES - 1  # 6560: the boundaries are (3^i - 1) / 6560
#: ``lr_final`` when unset: lr / 10 (Burda et al.'s 1e-3 -> 1e-4).
DEFAULT_FINAL_RATIO = 0.1


@dataclass(frozen=True)
class LRSchedule:
    """A learning-rate factor :math:`w_s d(p_s)` (see the module docstring).

    :param kind: one of :data:`LR_SCHEDULES`.
    :param warmup: 0 (none), a fraction of the run in (0, 1), or a whole number of steps >= 1.
    :param final_ratio: :math:`\\rho` = lr_final / lr, in [0, 1].
    """

    kind: str = "constant"
    warmup: float = 0.0
    final_ratio: float = DEFAULT_FINAL_RATIO

    @property
    def is_constant(self) -> bool:
        """Whether the factor is 1 at every step (nothing to apply)."""
        return self.kind == "constant" and self.warmup == 0

    def progress(self, step: int, total_steps: Optional[int], seconds: Optional[float] = None,
                 time_limit: Optional[float] = None) -> float:
        """:math:`p_s` as a float (for reports): ``step / total_steps`` and/or ``seconds / time_limit``."""
        parts = [step / total_steps] if total_steps else []
        if time_limit is not None and seconds is not None:
            parts.append(seconds / time_limit if time_limit > 0 else 1.0)
        return min(1.0, max(parts)) if parts else 0.0

    def stage(self, step: int, total_steps: Optional[int], seconds: Optional[float] = None,
              time_limit: Optional[float] = None) -> int:
        """``"step"``: the stage :math:`i` of step ``step`` (exact in steps: integer comparisons)."""
        found = 0
        for i in range(1, STEP_STAGES):
            boundary = STEP_GROWTH**i - 1
            by_steps = bool(total_steps) and step * _STEP_TOTAL >= boundary * total_steps
            by_time = time_limit is not None and seconds is not None and (
                time_limit <= 0 or seconds / time_limit >= boundary / _STEP_TOTAL)
            if by_steps or by_time:
                found = i
        return found

    def decay(self, step: int, total_steps: Optional[int], seconds: Optional[float] = None,
              time_limit: Optional[float] = None, halvings: int = 0) -> float:
        """:math:`d(p_s)` (``"plateau"``: :math:`2^{-k}` for ``halvings`` = :math:`k`)."""
        if self.kind == "constant":
            return 1.0
        if self.kind == "plateau":
            return PLATEAU_FACTOR**halvings
        if self.kind == "step":
            i = self.stage(step, total_steps, seconds, time_limit)
            return self.final_ratio ** (i / (STEP_STAGES - 1)) if i else 1.0
        p = self.progress(step, total_steps, seconds, time_limit)
        return self.final_ratio + (1.0 - self.final_ratio) * (1.0 + math.cos(math.pi * p)) / 2.0

    def warm(self, step: int, total_steps: Optional[int], seconds: Optional[float] = None,
             time_limit: Optional[float] = None) -> float:
        """:math:`w_s`."""
        if self.warmup == 0:
            return 1.0
        if self.warmup >= 1:
            return min(1.0, (step + 1) / self.warmup)
        q = self.progress(step + 1, total_steps, seconds, time_limit)
        return min(1.0, q / self.warmup)

    def __call__(self, step: int, total_steps: Optional[int], seconds: Optional[float] = None,
                 time_limit: Optional[float] = None, halvings: int = 0) -> float:
        """The factor :math:`w_s d(p_s)` on the base learning rate at step ``step`` (0-based); ``halvings``: the
        ``"plateau"`` schedule's :math:`k` (:func:`plateau_halvings` of the validation scores so far)."""
        if step < 0:
            raise ValueError(f"lr schedule: expected a step >= 0, received {step}")
        return self.warm(step, total_steps, seconds, time_limit) * self.decay(step, total_steps, seconds, time_limit,
                                                                             halvings)


def make_lr_schedule(kind: str = "constant", *, warmup: float = 0.0, lr: float = 1e-3,
                     lr_final: Optional[float] = None) -> LRSchedule:
    """The :class:`LRSchedule` of the ``[train]`` keys ``lr_schedule``, ``warmup``, ``lr`` and ``lr_final``.

    :raises UnknownNameError: an unknown schedule (the message lists the valid ones).
    :raises ValueError: a warm-up that is neither a fraction in (0, 1) nor a whole number of steps, an lr_final
        outside [0, lr], or an lr_final with the constant schedule.
    """
    if kind not in LR_SCHEDULES:
        raise UnknownNameError("lr_schedule", kind, LR_SCHEDULES)
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not math.isfinite(warmup) or warmup < 0 or (
            warmup >= 1 and warmup != int(warmup)):
        raise ValueError(f"warmup: expected 0, a fraction of the run in (0, 1) or a whole number of steps >= 1, "
                         f"received {warmup!r}")
    if lr_final is None:
        ratio = DEFAULT_FINAL_RATIO
    elif kind in ("constant", "plateau"):
        raise ValueError(f"lr_final: applies to the 'step' and 'cosine' schedules, not {kind!r} "
                         f"(received lr_final = {lr_final!r}); set lr_schedule or remove lr_final")
    elif isinstance(lr_final, bool) or not isinstance(lr_final, (int, float)) or not 0 <= lr_final <= lr:
        raise ValueError(f"lr_final: expected a learning rate in [0, lr = {lr!r}], received {lr_final!r}")
    else:
        ratio = lr_final / lr
    return LRSchedule(kind, float(warmup), float(ratio))


def plateau_halvings(scores: Sequence[float]) -> int:
    """:math:`k` of the ``"plateau"`` schedule: how many of the validation ``scores`` (higher is better, in
    order; NaN entries skipped) were not better than the best score before them (the first never counts)."""
    best, count = -math.inf, 0
    for n, value in enumerate(v for v in scores if not math.isnan(v)):
        if n > 0 and value <= best:
            count += 1
        best = max(best, value)
    return count


def validations_since_best(scores: Sequence[float]) -> int:
    """How many validations (NaN entries skipped) came after the best score (the first of equal bests); 0 for none."""
    values = [v for v in scores if not math.isnan(v)]
    if not values:
        return 0
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    return len(values) - 1 - best


#: ``[train] budget_clock``: what a run's training clock reads — wall seconds, or the CPU seconds of the process's
#: threads (a budget that other processes on a shared machine do not eat: one CPU budget per run).
BUDGET_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class RunClock:
    """A run's seconds by phase, on ``clock`` (:func:`time.perf_counter` unless a test injects another).

    Training time starts at the run's first training step (:meth:`start`), not before set-up; it is summed over
    the calls of a resumed run (:meth:`state` / :meth:`load_state` go into the checkpoint), and the fast path's
    compile time (``excluded``) is set-up, not training.  Validation time is part of the training time and is
    counted apart as well (:meth:`add_valid`).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.train_before = 0.0  # training seconds of earlier calls (restored from a checkpoint)
        self.valid_before = 0.0
        self.started: Optional[float] = None  # clock reading at this call's first training step
        self.valid_now = 0.0  # validation seconds of this call
        self.excluded_before = 0.0

    def new_call(self, excluded: float = 0.0) -> None:
        """A new call to ``fit``: earlier calls' seconds become ``*_before``; training restarts at the next step."""
        self.train_before = self.train_seconds(excluded)
        self.valid_before += self.valid_now
        self.started, self.valid_now = None, 0.0
        self.excluded_before = excluded  # compile seconds measured once for a trainer: not subtracted again

    def start(self) -> None:
        """The first training step of this call begins now (later calls do nothing)."""
        if self.started is None:
            self.started = self.clock()

    def train_seconds(self, excluded: float = 0.0) -> float:
        """Training seconds so far (:math:`t`), without ``excluded`` seconds (compile) of this trainer."""
        if self.started is None:
            return self.train_before
        return self.train_before + max(0.0, self.clock() - self.started - (excluded - self.excluded_before))

    def add_valid(self, seconds: float) -> None:
        self.valid_now += seconds

    @property
    def valid_seconds(self) -> float:
        return self.valid_before + self.valid_now

    def state(self, excluded: float = 0.0) -> dict:
        return {"train_seconds": self.train_seconds(excluded), "valid_seconds": self.valid_seconds}

    def load_state(self, state: dict, excluded: float = 0.0) -> None:
        self.train_before = float(state.get("train_seconds", 0.0))
        self.valid_before = float(state.get("valid_seconds", 0.0))
        self.started, self.valid_now, self.excluded_before = None, 0.0, excluded


def validation_rows(num_data: int, subset: Optional[int], seed: int) -> Optional[torch.Tensor]:
    """The rows of a validation split that validation scores: ``None`` (all, in order) when ``subset`` is unset,
    0 or at least ``num_data``; else ``subset`` rows drawn once without replacement by a generator seeded with
    ``seed`` (the same rows at every validation and after a resume), in increasing order."""
    if not subset or subset >= num_data:
        return None
    perm = torch.randperm(num_data, generator=torch.Generator().manual_seed(seed))
    return perm[:subset].sort().values
