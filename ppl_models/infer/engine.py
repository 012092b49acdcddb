"""The training engine: minibatch SVI for any model + guide + ELBO + data.

One step on a minibatch of indices ``idx`` of a data set of size ``N``::

    loss = -ELBO(model, guide; x[idx], idx, num_data=N)   # plates scale the batch by N / |idx|
    loss.backward(); optimizer.step()

The engine adds what a long run needs and nothing the model must know about:

* every source of randomness is explicit and saved: the torch/Python/NumPy
  generators Pyro samples from and the engine's own data generator (shuffling,
  dynamic binarization) — so ``resume`` continues **bit-identically**;
* an atomic checkpoint after every epoch (and on SIGINT/SIGTERM, mid-epoch),
  loadable without executing pickled code (:mod:`ppl_models.infer.checkpoint`);
* a progress bar with the running loss, a validation ELBO each epoch (or every ``valid_every`` steps) on a fixed
  subset of ``valid_subset`` rows, its time reported apart (``FitResult.valid_seconds``);
* a learning-rate schedule with warm-up over the run's length in steps or, with a ``time_limit``, in seconds
  (:mod:`ppl_models.infer.schedules`); the time budget's clock starts at the first training step and leaves out
  set-up and the fast path's compile, reported apart (``setup_seconds``, ``compile_seconds``);
* the fast path (:mod:`ppl_models.infer.fastpath`, ``"auto"`` by default) wherever the model, guide and objective
  allow it; the run records which path its steps took and why (``FitResult.fast_path``);
* a non-finite loss stops training with an error naming the step, the site
  whose log-density is not finite and any non-finite parameter, keeping the
  last good checkpoint;
* per-datapoint parameters (``nn.Embedding(sparse=True)``) are detected from
  their sparse gradients and updated by the sparse optimizer, rows of the
  batch only (:mod:`ppl_models.infer.optim`);
* with the ``parallel`` option (:class:`ppl_models.infer.distributed.DataParallel`) the same loop runs as
  one of several data-parallel processes, or on a GPU.

This module is over 600 lines because the Trainer is one state machine — step counters, optimizer and
schedule state, partial-epoch sums, run clock, checkpoint history — that ``state_dict``/``load_state_dict``
must save and restore as a whole for bit-identical resume; the parts that do not touch that state live beside
it (:mod:`~ppl_models.infer.failures`, :mod:`~ppl_models.infer.schedules`, :mod:`~ppl_models.infer.checkpoint`,
:mod:`~ppl_models.infer.fastpath`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import pyro
import torch
from tqdm.auto import tqdm

from ppl_models.infer.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    capture_rng_state,
    check_keep_last,
    checkpoint_path,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    missing_checkpoint_reason,
    newest_readable_checkpoint,
    restore_rng_state,
    rotation,
    save_checkpoint,
    set_aside_newer,
)
from ppl_models.infer.failures import (
    NonFiniteLossError,
    TrainingInterrupted,
    catch_signals,
    data_rows_named,
    find_non_finite_site,
    non_finite_rows,
    plate_depth,
)
from ppl_models.infer.fastpath import FastPath, fast_path_mode, fast_path_status, make_fast_path
from ppl_models.infer.objectives import make_elbo
from ppl_models.infer.optim import OPTIMIZER_NAMES, Optimizer, make_optimizer
from ppl_models.infer.threads import ThreadTuner, check_threads
from ppl_models.infer.schedules import (
    BUDGET_CLOCKS,
    RunClock,
    make_lr_schedule,
    plateau_halvings,
    validation_rows,
    validations_since_best,
)
from ppl_models.registry import UnknownNameError

if TYPE_CHECKING:  # pragma: no cover
    from ppl_models.data import Dataset

__all__ = ["Trainer", "fit", "FitResult", "NonFiniteLossError", "TrainingInterrupted"]


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Seconds: ``wall_time``, the whole call; ``setup_seconds``, the call's set-up before its first training step
    (from the trainer's ``setup_start`` when given: data loading, building) plus the fast path's compile;
    ``compile_seconds``, that compile; ``train_seconds``, the run's training clock (from its first step, summed over
    resumed calls, without set-up and compile: what ``time_limit`` bounds and a time-based schedule follows), of
    which ``valid_seconds`` validating.  ``fast_path``: the path the training steps took, ``"compile"``,
    ``"eager"`` (with the reason when another mode was asked for) or ``"off: <reason>"``.
    """

    history: Dict[str, list]
    step: int
    epoch: int
    wall_time: float
    checkpoint: Optional[Path] = None
    setup_seconds: float = 0.0
    train_seconds: float = 0.0
    valid_seconds: float = 0.0
    compile_seconds: float = 0.0
    fast_path: str = "off"
    threads: Optional[dict] = None
    best_step: Optional[int] = None  # with early_stopping: the step whose parameters the trainer holds at the end

    def to_metrics(self) -> dict:
        """The run's numbers as JSON (``train.json`` in the run directory); ``valid_share`` = valid / train seconds."""
        share = self.valid_seconds / self.train_seconds if self.train_seconds > 0 else 0.0
        return {"step": self.step, "epoch": self.epoch, "wall_seconds": self.wall_time,
                "setup_seconds": self.setup_seconds, "compile_seconds": self.compile_seconds,
                "train_seconds": self.train_seconds, "valid_seconds": self.valid_seconds, "valid_share": share,
                "fast_path": self.fast_path, "threads": self.threads, "best_step": self.best_step}


#: A note at the end of a run whose validation took more than this share of its training time (and >= 30 s).
VALID_SHARE_NOTE = 0.05


# Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = ("elbo", "num_particles", "optimizer", "lr", "batch_size", "seed", "num_data",
                "lr_schedule", "warmup", "lr_final")
_RESUME_DEFAULTS = {"lr_schedule": "constant", "warmup": 0.0, "lr_final": None}  # checkpoints written before them
_HISTORY_KEYS = ("epoch", "step", "train_elbo", "valid_elbo", "epoch_time", "log_step", "log_train_elbo", "log_lr",
                 "valid_step", "valid_step_elbo")


@dataclass
class Trainer:
    """Minibatch SVI over ``train`` (see the module docstring).

    :param model: a Pyro model ``model(*data, idx, num_data=N)``.
    :param guide: its guide, same signature.
    :param train: the training data (:class:`ppl_models.data.Dataset`).
    :param valid: optional validation data; its ELBO per datapoint is reported each epoch (``valid_every``).
    :param elbo: the objective and its gradient rule, by name (:data:`ppl_models.infer.objectives.ESTIMATORS`:
        Pyro's ELBOs, ``IWAE``, and the estimators ``reparameterized``, ``score-function``, ...).
    :param num_particles: samples per step (importance samples for IWAE).
    :param optimizer: optimizer name (:data:`ppl_models.infer.optim.OPTIMIZER_NAMES`).
    :param lr: learning rate (the base of the schedule).
    :param lr_schedule: ``"constant"``, ``"step"`` (Burda et al. 2016's stages) or ``"cosine"``, over the run's
        length in steps or, with a ``time_limit``, in seconds (:mod:`ppl_models.infer.schedules`).
    :param warmup: linear learning-rate warm-up: 0 (none), a fraction of the run in (0, 1) or a number of steps.
    :param lr_final: the learning rate at the end of a ``"step"`` or ``"cosine"`` schedule (``None``: ``lr / 10``).
    :param batch_size: datapoints per step.
    :param num_epochs: passes over ``train``.
    :param max_steps: stop after this many steps in total (``None``: no limit).
    :param time_limit: stop when the run's training clock reaches this many seconds (``None``: no limit): from its
        first training step (set-up before it and the fast path's compile are not counted), validation included,
        summed over resumed calls, as read from ``clock`` (default :func:`time.perf_counter`; tests pass a fake
        one), or from the process's CPU time with ``budget_clock = "cpu"``; for budgeted runs and comparing
        strategies on the same budget.
    :param budget_clock: what ``time_limit``, a time-based schedule and ``FitResult.train_seconds`` count:
        ``"wall"`` (``clock``) or ``"cpu"`` (:func:`time.process_time`, the CPU seconds of this process's
        threads: a budget that other processes on the machine do not eat; :data:`BUDGET_CLOCKS`).
    :param seed: seeds Pyro's generators and the engine's data generator.
    :param run_dir: where checkpoints and ``history.json`` go (``None``: nothing is written).
    :param keep_last: how many of the run's own newest checkpoints stay on disk (>= 1), or 0: all of them.
        Rotation goes by the run's write history; it never deletes the newest checkpoint nor a file the run
        did not write.  A fresh ``fit`` refuses a ``run_dir`` that already holds checkpoints (``resume=True``
        continues them); ``fit(resume=True)`` refuses when there is no readable checkpoint.
    :param progress: show a progress bar.
    :param validate: ``"first"`` checks distribution arguments and site shapes (Pyro validation)
        on the first step only, ``"always"`` on every step.
    :param callback: called as ``callback(trainer, step, loss)`` after each step.
    :param step_fn: a strategy's update rule ``step_fn(trainer, args, idx) -> loss`` replacing the joint
        step on every parameter (:mod:`ppl_models.infer.strategies`).
    :param threads: ``"auto"`` (the default: one thread or all, whichever trains faster now, re-measured as the
        machine's load changes; :mod:`ppl_models.infer.threads`) or a fixed positive number of threads.
    :param fast_path: ``"auto"`` (the default), ``False`` (Pyro's ELBO every step), ``True``/``"eager"`` or
        ``"compile"``: the objective captured once as a tensor function (:mod:`ppl_models.infer.fastpath`), falling
        back to Pyro's ELBO with a one-line notice when the model, guide or objective is not supported (``"auto"``
        rules it out silently when the settings do: a step rule, ``validate="always"``, another objective);
        ``FitResult.fast_path`` records the path taken and why.
    :param parallel: ``None`` (one process), or a :class:`~ppl_models.infer.distributed.DataParallel`: this
        trainer is one of the processes of a data-parallel job, or runs on a GPU (no fast path then).
    :param valid_subset: validate on this many rows of ``valid``, drawn once from ``seed`` (``None`` or 0: all).
    :param valid_every: validate every this many steps instead of at each epoch's end (``None``: each epoch);
        history ``valid_step`` / ``valid_step_elbo``.
    :param valid_loss: the validation score in place of the ELBO: ``valid_loss(*data, None) -> float``, the
        negative score summed over the batch's rows (e.g. a model's exact negative log-likelihood); ``None``: the
        objective's loss.
    :param early_stopping: stop once this many validations in a row were not better than the best one (``None``
        or 0: never); with ``lr_schedule = "plateau"`` each of them has also halved the learning rate.  The
        parameters of the best validation so far are kept (in memory and in every checkpoint, ``"best"``), and
        at the end of :meth:`fit` the trainer holds them (:meth:`use_best`; ``FitResult.best_step``), however
        the run ended: the model selected by validation, as Prechelt's early stopping returns it.  (One process
        only: with ``parallel`` a rank's parameters may be its own rows' alone, so the last ones are kept.)
    :param setup_start: ``clock()`` when the run's set-up began (the caller's data loading), for
        ``FitResult.setup_seconds``; ``None``: when :meth:`fit` is called.
    """

    model: Callable
    guide: Callable
    train: Dataset
    valid: Optional[Dataset] = None
    elbo: str = "Trace_ELBO"
    num_particles: int = 1
    optimizer: str = "adam"
    lr: float = 1e-3
    optimizer_kwargs: dict = field(default_factory=dict)
    batch_size: int = 128
    num_epochs: int = 10
    max_steps: Optional[int] = None
    time_limit: Optional[float] = None
    clock: Callable[[], float] = time.perf_counter
    budget_clock: str = "wall"
    seed: int = 0
    run_dir: Optional[Path] = None
    keep_last: int = 2
    progress: bool = True
    validate: str = "first"
    valid_batch_size: int = 1000
    log_every: int = 50
    callback: Optional[Callable] = None
    step_fn: Optional[Callable] = None
    fast_path: object = "auto"
    parallel: Optional[object] = None
    lr_schedule: str = "constant"
    warmup: float = 0.0
    lr_final: Optional[float] = None
    valid_subset: Optional[int] = 2000
    valid_every: Optional[int] = None
    setup_start: Optional[float] = None
    valid_loss: Optional[Callable] = None
    threads: object = "auto"
    early_stopping: Optional[int] = None

    def __post_init__(self):
        fast_path_mode(self.fast_path)  # a bad value is an error now, not at the first step
        check_threads(self.threads)
        self._tuner: Optional[ThreadTuner] = None
        self._fast: Optional[FastPath] = None
        self.fast_path_off: Optional[str] = None  # why make_fast_path ruled the fast path out
        if self.budget_clock not in BUDGET_CLOCKS:
            raise UnknownNameError("budget_clock", self.budget_clock, BUDGET_CLOCKS)
        self._clock = RunClock(self.clock if self.budget_clock == "wall" else BUDGET_CLOCKS[self.budget_clock])
        self._first_step_at: Optional[float] = None  # clock() at this call's first step (set-up ends there)
        self._best: Optional[dict] = None  # with early_stopping: {"step", "score", "params"} of the best validation
        if self.validate not in ("first", "always"):
            raise ValueError(f"validate: expected 'first' or 'always', received {self.validate!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, received {self.batch_size!r}")
        if not isinstance(self.num_epochs, int) or self.num_epochs < 0:
            raise ValueError(f"num_epochs: expected a non-negative integer, received {self.num_epochs!r}")
        for key, value in (("lr", self.lr), ("max_steps", self.max_steps), ("time_limit", self.time_limit)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{key}: expected a finite number > 0{'' if key == 'lr' else ' or None'}, received {value!r}")
        check_keep_last(self.keep_last)
        self._schedule = make_lr_schedule(self.lr_schedule, warmup=self.warmup, lr=self.lr, lr_final=self.lr_final)
        for key, least in (("valid_subset", 0), ("valid_every", 1), ("early_stopping", 0)):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"{key}: expected an integer >= {least} or None, received {value!r}")
        if self.optimizer not in OPTIMIZER_NAMES:
            raise UnknownNameError("optimizer", self.optimizer, OPTIMIZER_NAMES)
        if self.valid is None and (self.lr_schedule == "plateau" or self.early_stopping):
            raise ValueError("lr_schedule 'plateau' and early_stopping follow the validation score: they need "
                             "validation data (valid; [train] validate = true and a validation split)")
        self.num_data = int(self.train.num_data)
        if self.num_data < 1:
            raise ValueError("train: the training data set is empty")
        self.run_dir = Path(self.run_dir) if self.run_dir is not None else None
        self._elbo = make_elbo(self.elbo, num_particles=self.num_particles)
        self._differentiable = hasattr(type(self._elbo), "differentiable_loss")
        self._valid_elbo = make_elbo(self.elbo, num_particles=self.num_particles)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.step = 0
        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0
        self.perm: Optional[torch.Tensor] = None
        self.history: Dict[str, list] = {key: [] for key in _HISTORY_KEYS}
        self._valid_rows = None if self.valid is None else validation_rows(
            int(self.valid.num_data), self.valid_subset, self.seed)
        if self.parallel is not None:
            self.parallel.attach(self)
            self.progress = self.progress and self.parallel.rank == 0
        self._optim: Optional[Optimizer] = None
        self._names: List[str] = []
        self._epoch_loss_sum = 0.0
        self._epoch_steps = 0
        self._log_loss_sum = 0.0
        self._log_steps = 0
        self._written: List[str] = []  # checkpoints this run wrote, oldest first (rotation goes by it)
        self._resumed_from: Optional[Path] = None

    # ------------------------------------------------------------------ set-up
    @property
    def settings(self) -> dict:
        return {k: getattr(self, k) for k in _RESUME_KEYS}

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_data / self.batch_size)

    @property
    def planned_steps(self) -> int:
        """The run's length in steps :math:`S`: ``num_epochs`` × batches per epoch, at most ``max_steps``."""
        total = self.num_epochs * self.num_batches
        return total if self.max_steps is None else min(total, self.max_steps)

    def train_seconds(self) -> float:
        """The run's training clock :math:`t` (see ``time_limit``)."""
        return self._clock.train_seconds(self._compile_seconds())

    def _compile_seconds(self) -> float:
        return (self._fast.compile_seconds or 0.0) if self._fast is not None else 0.0

    def lr_factor(self) -> float:
        """The schedule's factor on every group's lr at the next step (:mod:`ppl_models.infer.schedules`)."""
        seconds = None if self.time_limit is None else self.train_seconds()
        halvings = plateau_halvings(self.validation_scores()) if self.lr_schedule == "plateau" else 0
        return self._schedule(self.step, self.planned_steps, seconds, self.time_limit, halvings)

    def validation_scores(self) -> List[float]:
        """The run's validation scores so far, in order (``valid_step_elbo`` with ``valid_every``, else
        ``valid_elbo``): what ``"plateau"`` and ``early_stopping`` follow."""
        return list(self.history["valid_step_elbo" if self.valid_every is not None else "valid_elbo"])

    @property
    def stopped_early(self) -> bool:
        """``early_stopping`` validations in a row were not better than the best one."""
        return bool(self.early_stopping) and validations_since_best(self.validation_scores()) >= self.early_stopping

    @property
    def checkpoint_dir(self) -> Optional[Path]:
        return None if self.run_dir is None else self.run_dir / "checkpoints"

    @property
    def objective(self):
        """The Pyro ELBO object that training steps minimize (built from ``elbo`` and ``num_particles``)."""
        return self._elbo

    def loss_kwargs(self) -> dict:
        """Keyword arguments of model and guide at a training step (``num_data``; subclasses add their own)."""
        return {"num_data": self.num_data}

    def _setup(self) -> None:
        """Register every parameter and find the sparse ones, without touching any generator.

        One loss and backward pass on the first rows, inside ``fork_rng`` and
        with a throw-away data generator; then the optimizer is built.
        """
        if self._optim is not None:
            return
        parallel = self.parallel  # with it, this rank's own rows, on its device
        idx = torch.arange(min(self.batch_size, self.num_data)) if parallel is None else parallel.setup_rows(self.batch_size)
        *args, idx = self._on_device((*self.train.batch(idx, torch.Generator().manual_seed(self.seed)), idx))
        with torch.random.fork_rng(devices=self._rng_devices()), data_rows_named(args, idx):
            depth = plate_depth(self.model, self.guide, args, idx, self.loss_kwargs())
            for elbo in (self._elbo, self._valid_elbo):
                if elbo.max_plate_nesting == float("inf"):
                    elbo.max_plate_nesting = depth + int(elbo.vectorize_particles and elbo.num_particles > 1)
            loss = self._loss_and_grads(args, idx)
        if not math.isfinite(loss):
            self._raise_non_finite(loss, args, idx, during="set-up")
        store = pyro.get_param_store()
        names = sorted(store.keys())
        if not names:
            raise ValueError("model and guide have no parameters to train (no pyro.param or pyro.module)")
        named = [(n, store._params[n]) for n in names]
        sparse_ids = {id(p) for _, p in named if p.grad is not None and p.grad.is_sparse}
        for _, p in named:
            p.grad = None
        self._names = names
        self._optim = make_optimizer(self.optimizer, named, lr=self.lr, sparse_ids=sparse_ids, **self.optimizer_kwargs)
        if parallel is not None:
            parallel.setup_done(named)
        else:
            self._fast = make_fast_path(self)

    # -------------------------------------------------------------- one step
    def _loss_and_grads(self, args, idx) -> float:
        kwargs = self.loss_kwargs()
        if self.parallel is not None:
            loss = self.parallel.loss(args, idx, kwargs)
        elif self._differentiable:
            loss = self._elbo.differentiable_loss(self.model, self.guide, *args, idx, **kwargs)
        else:
            return float(self._elbo.loss_and_grads(self.model, self.guide, *args, idx, **kwargs))
        value = loss.item()
        if math.isfinite(value):
            loss.backward()
        return value

    def train_step(self, args, idx) -> float:
        """One optimizer step on the batch ``(*args, idx)``; returns its loss (the N/batch-scaled -ELBO estimate).

        Exactly what :meth:`fit` does for each batch (Pyro validation as ``validate`` says, ``step``
        counted), without the epoch position, logging, callback or checkpoints: for benchmarks and
        custom loops.  Builds the optimizer first if :meth:`fit` has not.
        """
        if self._optim is None:
            self._setup()
        if self._first_step_at is None:
            self._first_step_at = self.clock()
        self._clock.start()
        if not self._schedule.is_constant:
            self._optim.lr_factor = self.lr_factor()
        with pyro.validation_enabled(self.validate == "always" or self.step == 0):
            if self.step_fn is None:
                loss = self._train_step(args, idx)
            else:
                loss = self.step_fn(self, args, idx)
        self.step += 1
        return loss

    def _train_step(self, args, idx) -> float:
        self._optim.zero_grad()
        if self.parallel is not None:  # this rank's rows; the loss of the global batch
            args, idx, loss = self.parallel.loss_and_grads(args, idx, self.loss_kwargs(), self._deadline_passed())
        else:
            loss = None if self._fast is None else self._fast.try_loss_and_grads((*args, idx), self.loss_kwargs())
            if loss is None:
                loss = self._loss_and_grads(args, idx)
        if not math.isfinite(loss):
            self._raise_non_finite(loss, args, idx)
        self._optim.step()
        return loss

    def _check_loss(self, loss: torch.Tensor, args, idx) -> float:
        """The loss as a float; a non-finite one raises :class:`NonFiniteLossError` (for strategies' steps)."""
        value = loss.item()
        if not math.isfinite(value):
            self._raise_non_finite(value, args, idx)
        return value

    # ------------------------------------------------------------ non-finite
    def _raise_non_finite(self, loss: float, args, idx, during: str = "") -> None:
        site, detail = find_non_finite_site(self.model, self.guide, args, idx, self.loss_kwargs())
        bad_params = [n for n, p in pyro.get_param_store().named_parameters() if not bool(torch.isfinite(p).all())]
        where = during or f"step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch_in_epoch + 1})"
        parts = [f"non-finite loss {loss} at {where}"]
        parts.append(detail if site else "no site has a non-finite log-density on a fresh draw")
        if bad_params:
            parts.append("non-finite parameters: " + ", ".join(bad_params))
        rows = non_finite_rows(args, idx)
        if rows:
            parts.append(rows)
        kept = self._latest_checkpoint_path()
        parts.append(f"last good checkpoint kept: {kept}" if kept else "no checkpoint was written before")
        raise NonFiniteLossError("; ".join(parts), step=self.step + 1, site=site, checkpoint=kept)

    def _latest_checkpoint_path(self) -> Optional[Path]:
        """The newest checkpoint this run wrote (or resumed from)."""
        if self.checkpoint_dir is None or not self._written:
            return None
        return self.checkpoint_dir / self._written[-1]

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """The checkpoint's state; with ``parallel`` collective, and complete on rank 0 only."""
        store = pyro.get_param_store()
        state = {
            "settings": self.settings,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "params": {n: store._params[n].detach().clone() for n in self._names},
            "optimizer": self._optim.state_dict(),
            "rng": capture_rng_state(),
            "generator": self.generator.get_state(),
            "perm": self.perm if self.perm is not None else torch.zeros(0, dtype=torch.long),
            "history": self.history,
            "partial": [self._epoch_loss_sum, self._epoch_steps, self._log_loss_sum, self._log_steps],
            "checkpoints": list(self._written),  # the run's write history (rotation goes by it)
            "clock": self._clock.state(self._compile_seconds()),
            "best": self._best,
        }
        return state if self.parallel is None else self.parallel.gather_state(state, self._names, self._optim)

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a full checkpoint; with ``parallel`` every rank takes its own part)."""
        self._setup()
        if self.parallel is not None:
            state = self.parallel.rank_state(state, self._names, self._optim)
        saved = state["settings"]
        for key in _RESUME_KEYS:
            value = saved.get(key, _RESUME_DEFAULTS.get(key))
            if value != getattr(self, key):
                raise CheckpointError(
                    f"cannot resume: setting {key!r} was {value!r} in the checkpoint, received {getattr(self, key)!r}"
                )
        params = state["params"]
        if sorted(params) != self._names:
            raise CheckpointError(f"cannot resume: checkpoint has parameters {sorted(params)}, the run has {self._names}")
        store = pyro.get_param_store()
        with torch.no_grad():
            for name, value in params.items():
                target = store._params[name]
                if target.shape != value.shape:
                    raise CheckpointError(
                        f"cannot resume: parameter {name!r} has shape {tuple(value.shape)} in the checkpoint, "
                        f"expected {tuple(target.shape)}"
                    )
                target.copy_(value)
        self._optim.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.perm = state["perm"] if state["perm"].numel() else None
        self.history = state["history"]
        for key in _HISTORY_KEYS:
            self.history.setdefault(key, [])
        self._epoch_loss_sum, self._epoch_steps, self._log_loss_sum, self._log_steps = state["partial"]
        written = state.get("checkpoints")  # without a write history (older files): those up to this step
        found = [] if self.checkpoint_dir is None else list_checkpoints(self.checkpoint_dir)
        self._written = list(written) if written is not None else [p.name for p in found if checkpoint_step(p) <= self.step]
        self._clock.load_state(state.get("clock", {}), self._compile_seconds())
        self._best = state.get("best")

    def save(self) -> Optional[Path]:  # with ``parallel``: collective, rank 0 writes
        if self.checkpoint_dir is None:
            return None
        bad = [n for n in self._names if not bool(torch.isfinite(pyro.get_param_store()._params[n]).all())]
        if bad if self.parallel is None else self.parallel.any_rank(bool(bad)):
            raise NonFiniteLossError(
                f"not saving a checkpoint at step {self.step}: non-finite parameters "
                f"{', '.join(bad) if bad else 'on another rank'}",
                step=self.step,
                site=None,
                checkpoint=self._latest_checkpoint_path(),
            )
        state = self.state_dict()
        if self.parallel is not None and self.parallel.rank != 0:
            path = checkpoint_path(self.checkpoint_dir, self.step)
            history, drop = rotation(self._written, path.name, self.keep_last)  # what rank 0 keeps
            self._written = history[len(drop):]
            return path
        path, self._written = save_checkpoint(self.checkpoint_dir, state, keep_last=self.keep_last)
        self._write_history()
        return path

    def _write_history(self) -> None:
        if self.run_dir is not None:
            text = json.dumps(self.history, indent=1).encode()
            atomic_write_bytes(self.run_dir / "history.json", lambda f: f.write(text))

    def resume(self) -> Optional[Path]:
        """Load the newest readable checkpoint of ``run_dir`` (with ``parallel``: the one rank 0 chose, on every
        rank); returns its path (``None`` if there is none)."""
        if self.checkpoint_dir is None:
            raise ValueError("resume needs a run_dir")
        path, state = None, None
        if self.parallel is None or self.parallel.rank == 0:
            path, state = newest_readable_checkpoint(self.checkpoint_dir, report=True)
        if self.parallel is not None:
            path = self.parallel.agree_on_checkpoint(path)
        if path is not None:
            self.load_state_dict(state if state is not None else load_checkpoint(path))
            self._resumed_from = path
        return path

    def _resume_or_refuse(self) -> None:
        """``fit(resume=True)``: continue from the newest readable checkpoint, or refuse, naming what is missing;
        newer unreadable checkpoints it skipped are set aside (renamed ``*.unreadable``), never deleted."""
        path = self._resumed_from or self.resume()
        if path is None:
            raise CheckpointError(f"cannot resume: no readable checkpoint: {missing_checkpoint_reason(self.checkpoint_dir)}")
        if self.parallel is None or self.parallel.rank == 0:
            for moved in set_aside_newer(self.checkpoint_dir, path):
                print(f"note: the unreadable checkpoint was set aside as {moved}", file=sys.stderr)
            print(f"resumed from {path} (step {self.step}, epoch {self.epoch})", file=sys.stderr)

    def _refuse_earlier_checkpoints(self) -> None:
        """A fresh ``fit`` never mixes its checkpoints with an earlier training's (that one is continued with
        ``resume=True``)."""
        if self.checkpoint_dir is None or (self.parallel is not None and self.parallel.rank != 0):
            return
        found = list_checkpoints(self.checkpoint_dir)
        if found:
            raise CheckpointError(
                f"{self.checkpoint_dir} already holds checkpoints of an earlier training (newest {found[-1].name}): "
                "continue it with resume=True (--resume), or train into another run directory")

    # ------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_elbo(self) -> float:
        """ELBO per datapoint (or ``valid_loss``'s score) on ``valid``, or on its ``valid_subset`` rows: the same rows
        and the same random draws (its own generators, seeded from ``seed``) at every validation, so the curve moves
        with the model alone; training randomness is untouched.  Its time is counted in ``valid_seconds``."""
        started = self.clock()
        rows = self._valid_rows
        n = int(self.valid.num_data) if rows is None else len(rows)
        total = 0.0
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(self.seed * 1_000_003)
            gen = torch.Generator().manual_seed(self.seed)
            for start in range(0, n, self.valid_batch_size):
                idx = torch.arange(start, min(n, start + self.valid_batch_size))
                args = self._on_device(self.valid.batch(idx if rows is None else rows[idx], gen))
                if self.valid_loss is not None:
                    total += float(self.valid_loss(*args, None))
                else:
                    total += float(self._valid_elbo.loss(self.model, self.guide, *args, None))
        self._clock.add_valid(self.clock() - started)
        return -total / n

    def _keep_if_best(self) -> None:
        """With ``early_stopping``: a copy of the parameters when the validation just appended is the best so far."""
        scores = self.validation_scores()
        if not self.early_stopping or self.parallel is not None or not scores or math.isnan(scores[-1]):
            return
        if validations_since_best(scores) > 0:
            return
        store = pyro.get_param_store()
        self._best = {"step": self.step, "score": scores[-1],
                      "params": {n: store._params[n].detach().clone() for n in self._names}}

    def use_best(self) -> Optional[int]:
        """Put the parameters of the best validation so far (``early_stopping``) into the param store; returns
        their step, or ``None`` when none were kept (nothing changes then)."""
        if self._best is None:
            return None
        store = pyro.get_param_store()
        with torch.no_grad():
            for name, value in self._best["params"].items():
                store._params[name].copy_(value)
        return int(self._best["step"])

    def _on_device(self, args) -> tuple:
        return args if self.parallel is None else self.parallel.to_device(args)

    def _rng_devices(self) -> list:  # the CUDA generators fork_rng must keep
        return [] if self.parallel is None else self.parallel.rng_devices

    # ------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> FitResult:
        start_time = self.clock()
        compile_before = self._compile_seconds()
        self._clock.new_call(compile_before)  # the training clock restarts at this call's first step
        self._first_step_at = None
        if resume:  # a checkpoint resume() already loaded is not loaded again
            self._resume_or_refuse()
        else:
            self._refuse_earlier_checkpoints()
            pyro.set_rng_seed(self.seed)
        self._setup()
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # one thread count for all ranks of a data-parallel job: theirs are fixed
        self._tuner = ThreadTuner(self.threads if self.parallel is None else torch.get_num_threads())
        with catch_signals() as caught, self._tuner:
            if self.parallel is not None:  # the loop reads what all ranks agreed on, never a rank's own signal
                caught = self.parallel.agreement(caught)
            while self.epoch < self.num_epochs and not self._done():
                self._run_epoch(caught)
        if self._done() and self.batch_in_epoch > 0:
            self.save()  # stopped mid-epoch by max_steps, time_limit or early stopping: resumable from here
        if self.stopped_early and (self.parallel is None or self.parallel.rank == 0):
            scores = self.validation_scores()
            print(f"early stopping at step {self.step}: {self.early_stopping} validations without a better score "
                  f"than {max(scores):.4f}", file=sys.stderr)
        best_step = self.use_best() if self.early_stopping else None
        if best_step is not None and best_step != self.step and (self.parallel is None or self.parallel.rank == 0):
            print(f"the trainer holds the parameters of step {best_step}, the best validation "
                  f"({self._best['score']:.4f}); the checkpoints hold step {self.step} to resume from", file=sys.stderr)
        return self._result(start_time, compile_before, best_step)

    def _result(self, start_time: float, compile_before: float, best_step: Optional[int] = None) -> FitResult:
        """The :class:`FitResult` of a :meth:`fit` call begun at ``start_time``; written to ``train.json``."""
        end = self.clock()
        compiled = self._compile_seconds() - compile_before
        first_step = end if self._first_step_at is None else self._first_step_at
        setup_from = start_time if self.setup_start is None else self.setup_start
        result = FitResult(self.history, self.step, self.epoch, end - start_time, self._latest_checkpoint_path(),
                           setup_seconds=first_step - setup_from + compiled, train_seconds=self.train_seconds(),
                           valid_seconds=self._clock.valid_seconds, compile_seconds=compiled,
                           fast_path=fast_path_status(self, self._fast),
                           threads=self._tuner.summary(), best_step=best_step)
        if self.parallel is None or self.parallel.rank == 0:
            share = result.to_metrics()["valid_share"]
            if share > VALID_SHARE_NOTE and result.train_seconds >= 30:
                print(f"note: validation took {100 * share:.1f} % of the training time ({result.valid_seconds:.1f} s); "
                      "lower valid_subset or validate less often (valid_every)", file=sys.stderr)
            if self.run_dir is not None:
                text = json.dumps(result.to_metrics(), indent=1).encode()
                atomic_write_bytes(self.run_dir / "train.json", lambda f: f.write(text))
        return result

    def _done(self) -> bool:
        if self.max_steps is not None and self.step >= self.max_steps:
            return True
        if self.stopped_early:
            return True
        return self._deadline_passed() if self.parallel is None else self.parallel.agreed.deadline

    def _deadline_passed(self) -> bool:
        return self.time_limit is not None and self.train_seconds() >= self.time_limit

    def _run_epoch(self, caught) -> None:
        epoch_start = self.clock()
        if self.perm is None or self.batch_in_epoch == 0:
            order = getattr(self.train, "epoch_order", None)  # a data set may order an epoch (length buckets)
            if order is not None:
                self.perm = order(self.batch_size, self.generator)
            else:
                self.perm = torch.randperm(self.num_data, generator=self.generator)
            self._epoch_loss_sum, self._epoch_steps = 0.0, 0
        bar = tqdm(
            total=self.num_batches,
            initial=self.batch_in_epoch,
            desc=f"epoch {self.epoch + 1}/{self.num_epochs}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        try:
            while self.batch_in_epoch < self.num_batches:
                if self._done():
                    return
                b = self.batch_in_epoch
                idx = self.perm[b * self.batch_size : (b + 1) * self.batch_size]
                args = self.train.batch(idx, self.generator)
                started = time.perf_counter()  # wall time, for the thread tuner (not the run's clock)
                with data_rows_named(args, idx):
                    loss = self.train_step(args, idx)
                self._tuner.after_step(time.perf_counter() - started)
                self.batch_in_epoch += 1
                per_datapoint = loss / self.num_data
                self._epoch_loss_sum += per_datapoint
                self._epoch_steps += 1
                self._log_loss_sum += per_datapoint
                self._log_steps += 1
                if self._log_steps >= self.log_every:
                    self.history["log_step"].append(self.step)
                    self.history["log_train_elbo"].append(-self._log_loss_sum / self._log_steps)
                    self.history["log_lr"].append(self.lr * self._optim.lr_factor)
                    self._log_loss_sum, self._log_steps = 0.0, 0
                if self.progress:  # the epoch's running mean, as the epoch's line reports it at its end
                    bar.set_postfix_str(f"train ELBO {-self._epoch_loss_sum / self._epoch_steps:.3f}", refresh=False)
                bar.update(1)
                if self.valid is not None and self.valid_every is not None and self.step % self.valid_every == 0:
                    self.history["valid_step"].append(self.step)
                    self.history["valid_step_elbo"].append(self.validation_elbo())
                    self._keep_if_best()
                if self.callback is not None:
                    self.callback(self, self.step, loss)
                if caught.signum is not None:
                    path = self.save()
                    raise TrainingInterrupted(caught.signum, self.step, path)
        finally:
            bar.close()
        # epoch completed
        self.epoch += 1
        self.batch_in_epoch = 0
        self.perm = None
        train_elbo = -self._epoch_loss_sum / max(1, self._epoch_steps)
        valid_elbo = self.validation_elbo() if self.valid is not None and self.valid_every is None else float("nan")
        elapsed = self.clock() - epoch_start
        for key, value in (("epoch", self.epoch), ("step", self.step), ("train_elbo", train_elbo),
                           ("valid_elbo", valid_elbo), ("epoch_time", elapsed)):
            self.history[key].append(value)
        if self.valid is not None and self.valid_every is None:
            self._keep_if_best()
        if self.progress:
            msg = f"epoch {self.epoch}/{self.num_epochs}  train ELBO {train_elbo:.3f}"
            if self.valid is not None and self.valid_every is None:
                msg += f"  valid ELBO {valid_elbo:.3f}"
            tqdm.write(msg + f"  ({elapsed:.1f} s)", file=sys.stderr)
        self.save()
        if caught.signum is not None:
            raise TrainingInterrupted(caught.signum, self.step, self._latest_checkpoint_path())


def fit(model: Callable, guide: Callable, train: Dataset, *, resume: bool = False, **kwargs) -> FitResult:
    """Train ``model`` and ``guide`` on ``train``; keyword arguments are :class:`Trainer`'s."""
    return Trainer(model, guide, train, **kwargs).fit(resume=resume)
