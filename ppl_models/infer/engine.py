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
* a progress bar with the running loss, a validation ELBO each epoch;
* a non-finite loss stops training with an error naming the step, the site
  whose log-density is not finite and any non-finite parameter, keeping the
  last good checkpoint;
* per-datapoint parameters (``nn.Embedding(sparse=True)``) are detected from
  their sparse gradients and updated by the sparse optimizer, rows of the
  batch only (:mod:`ppl_models.infer.optim`);
* with the ``parallel`` option (:class:`ppl_models.infer.distributed.DataParallel`) the same loop runs as
  one of several data-parallel processes, or on a GPU.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import pyro
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from ppl_models.infer.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    capture_rng_state,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    newest_readable_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from ppl_models.infer.fastpath import FastPath, fast_path_mode, make_fast_path
from ppl_models.infer.objectives import make_elbo
from ppl_models.infer.optim import OPTIMIZER_NAMES, Optimizer, make_optimizer
from ppl_models.registry import UnknownNameError

if TYPE_CHECKING:  # pragma: no cover
    from ppl_models.data import Dataset

__all__ = ["Trainer", "fit", "FitResult", "NonFiniteLossError", "TrainingInterrupted"]


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


@dataclass
class FitResult:
    """What :func:`fit` returns."""

    history: Dict[str, list]
    step: int
    epoch: int
    wall_time: float
    checkpoint: Optional[Path] = None


# Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = ("elbo", "num_particles", "optimizer", "lr", "batch_size", "seed", "num_data")


@dataclass
class Trainer:
    """Minibatch SVI over ``train`` (see the module docstring).

    :param model: a Pyro model ``model(*data, idx, num_data=N)``.
    :param guide: its guide, same signature.
    :param train: the training data (:class:`ppl_models.data.Dataset`).
    :param valid: optional validation data; its ELBO per datapoint is reported each epoch.
    :param elbo: objective name (:data:`ppl_models.infer.objectives.ELBO_NAMES`).
    :param num_particles: samples per step (importance samples for IWAE).
    :param optimizer: optimizer name (:data:`ppl_models.infer.optim.OPTIMIZER_NAMES`).
    :param lr: learning rate.
    :param batch_size: datapoints per step.
    :param num_epochs: passes over ``train``.
    :param max_steps: stop after this many steps in total (``None``: no limit).
    :param time_limit: stop after this many seconds of this call to :meth:`fit` (``None``: no limit);
        for comparing strategies on the same wall-time budget.
    :param seed: seeds Pyro's generators and the engine's data generator.
    :param run_dir: where checkpoints and ``history.json`` go (``None``: nothing is written).
    :param keep_last: checkpoints kept on disk.
    :param progress: show a progress bar.
    :param validate: ``"first"`` checks distribution arguments and site shapes (Pyro validation)
        on the first step only, ``"always"`` on every step.
    :param callback: called as ``callback(trainer, step, loss)`` after each step.
    :param step_fn: a strategy's update rule ``step_fn(trainer, args, idx) -> loss`` replacing the joint
        step on every parameter (:mod:`ppl_models.infer.strategies`).
    :param fast_path: ``False`` (Pyro's ELBO every step), ``True``/``"eager"``, ``"compile"`` or ``"auto"``:
        the objective captured once as a tensor function (:mod:`ppl_models.infer.fastpath`), falling back
        to Pyro's ELBO with a one-line notice when the model, guide or objective is not supported.
    :param parallel: ``None`` (one process), or a :class:`~ppl_models.infer.distributed.DataParallel`: this
        trainer is one of the processes of a data-parallel job, or runs on a GPU (no fast path then).
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
    seed: int = 0
    run_dir: Optional[Path] = None
    keep_last: int = 2
    progress: bool = True
    validate: str = "first"
    valid_batch_size: int = 1000
    log_every: int = 50
    callback: Optional[Callable] = None
    step_fn: Optional[Callable] = None
    fast_path: object = False
    parallel: Optional[object] = None

    def __post_init__(self):
        fast_path_mode(self.fast_path)  # a bad value is an error now, not at the first step
        self._fast: Optional[FastPath] = None
        if self.validate not in ("first", "always"):
            raise ValueError(f"validate: expected 'first' or 'always', received {self.validate!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, received {self.batch_size!r}")
        if not isinstance(self.num_epochs, int) or self.num_epochs < 0:
            raise ValueError(f"num_epochs: expected a non-negative integer, received {self.num_epochs!r}")
        if self.optimizer not in OPTIMIZER_NAMES:
            raise UnknownNameError("optimizer", self.optimizer, OPTIMIZER_NAMES)
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
        self.history: Dict[str, list] = {
            key: [] for key in ("epoch", "step", "train_elbo", "valid_elbo", "epoch_time", "log_step", "log_train_elbo")
        }
        if self.parallel is not None:
            self.parallel.attach(self)
            self.progress = self.progress and self.parallel.rank == 0
        self._optim: Optional[Optimizer] = None
        self._deadline: Optional[float] = None
        self._names: List[str] = []
        self._epoch_loss_sum = 0.0
        self._epoch_steps = 0
        self._log_loss_sum = 0.0
        self._log_steps = 0

    # ------------------------------------------------------------------ set-up
    @property
    def settings(self) -> dict:
        return {k: getattr(self, k) for k in _RESUME_KEYS}

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_data / self.batch_size)

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
        with torch.random.fork_rng(devices=self._rng_devices()):
            depth = _plate_depth(self.model, self.guide, args, idx, self.loss_kwargs())
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
        site, detail = _find_non_finite_site(self.model, self.guide, args, idx, self.loss_kwargs())
        bad_params = [n for n, p in pyro.get_param_store().named_parameters() if not bool(torch.isfinite(p).all())]
        where = during or f"step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch_in_epoch + 1})"
        parts = [f"non-finite loss {loss} at {where}"]
        parts.append(detail if site else "no site has a non-finite log-density on a fresh draw")
        if bad_params:
            parts.append("non-finite parameters: " + ", ".join(bad_params))
        kept = self._latest_checkpoint_path()
        parts.append(f"last good checkpoint kept: {kept}" if kept else "no checkpoint was written before")
        raise NonFiniteLossError("; ".join(parts), step=self.step + 1, site=site, checkpoint=kept)

    def _latest_checkpoint_path(self) -> Optional[Path]:
        if self.checkpoint_dir is None:
            return None
        found = list_checkpoints(self.checkpoint_dir)
        return found[-1] if found else None

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
        }
        return state if self.parallel is None else self.parallel.gather_state(state, self._names, self._optim)

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a full checkpoint; with ``parallel`` every rank takes its own part)."""
        self._setup()
        if self.parallel is not None:
            state = self.parallel.rank_state(state, self._names, self._optim)
        saved = state["settings"]
        for key in _RESUME_KEYS:
            if saved.get(key) != getattr(self, key):
                raise CheckpointError(
                    f"cannot resume: setting {key!r} was {saved.get(key)!r} in the checkpoint, "
                    f"received {getattr(self, key)!r}"
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
        self._epoch_loss_sum, self._epoch_steps, self._log_loss_sum, self._log_steps = state["partial"]

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
            return checkpoint_path(self.checkpoint_dir, self.step)
        path = save_checkpoint(self.checkpoint_dir, state, keep_last=self.keep_last)
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
        return path

    # ------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_elbo(self) -> float:
        """ELBO per datapoint on ``valid`` (its own seeded generators: training randomness is untouched)."""
        n = int(self.valid.num_data)
        total = 0.0
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(self.seed * 1_000_003 + self.epoch)
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            for start in range(0, n, self.valid_batch_size):
                idx = torch.arange(start, min(n, start + self.valid_batch_size))
                args = self._on_device(self.valid.batch(idx, gen))
                total += float(self._valid_elbo.loss(self.model, self.guide, *args, None))
        return -total / n

    def _on_device(self, args) -> tuple:
        return args if self.parallel is None else self.parallel.to_device(args)

    def _rng_devices(self) -> list:  # the CUDA generators fork_rng must keep
        return [] if self.parallel is None else self.parallel.rng_devices

    # ------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> FitResult:
        start_time = time.perf_counter()
        self._deadline = None if self.time_limit is None else start_time + self.time_limit
        if resume:
            path = self.resume()
            if path is not None:
                print(f"resumed from {path} (step {self.step}, epoch {self.epoch})", file=sys.stderr)
        else:
            pyro.set_rng_seed(self.seed)
        self._setup()
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        with _catch_signals() as caught:
            if self.parallel is not None:  # the loop reads what all ranks agreed on, never a rank's own signal
                caught = self.parallel.agreement(caught)
            while self.epoch < self.num_epochs and not self._done():
                self._run_epoch(caught)
        if self._done() and self.batch_in_epoch > 0:
            self.save()  # stopped mid-epoch by max_steps or time_limit: resumable from here
        return FitResult(self.history, self.step, self.epoch, time.perf_counter() - start_time, self._latest_checkpoint_path())

    def _done(self) -> bool:
        if self.max_steps is not None and self.step >= self.max_steps:
            return True
        return self._deadline_passed() if self.parallel is None else self.parallel.agreed.deadline

    def _deadline_passed(self) -> bool:
        return self._deadline is not None and time.perf_counter() >= self._deadline

    def _run_epoch(self, caught) -> None:
        epoch_start = time.perf_counter()
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
                loss = self.train_step(args, idx)
                self.batch_in_epoch += 1
                per_datapoint = loss / self.num_data
                self._epoch_loss_sum += per_datapoint
                self._epoch_steps += 1
                self._log_loss_sum += per_datapoint
                self._log_steps += 1
                if self._log_steps >= self.log_every:
                    self.history["log_step"].append(self.step)
                    self.history["log_train_elbo"].append(-self._log_loss_sum / self._log_steps)
                    bar.set_postfix_str(f"-ELBO/N {self._log_loss_sum / self._log_steps:.3f}", refresh=False)
                    self._log_loss_sum, self._log_steps = 0.0, 0
                bar.update(1)
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
        valid_elbo = self.validation_elbo() if self.valid is not None else float("nan")
        elapsed = time.perf_counter() - epoch_start
        for key, value in (
            ("epoch", self.epoch),
            ("step", self.step),
            ("train_elbo", train_elbo),
            ("valid_elbo", valid_elbo),
            ("epoch_time", elapsed),
        ):
            self.history[key].append(value)
        if self.progress:
            msg = f"epoch {self.epoch}/{self.num_epochs}  train ELBO {train_elbo:.3f}"
            if self.valid is not None:
                msg += f"  valid ELBO {valid_elbo:.3f}"
            tqdm.write(msg + f"  ({elapsed:.1f} s)", file=sys.stderr)
        self.save()
        if caught.signum is not None:
            raise TrainingInterrupted(caught.signum, self.step, self._latest_checkpoint_path())


def fit(model: Callable, guide: Callable, train: Dataset, *, resume: bool = False, **kwargs) -> FitResult:
    """Train ``model`` and ``guide`` on ``train``; keyword arguments are :class:`Trainer`'s."""
    return Trainer(model, guide, train, **kwargs).fit(resume=resume)


def _plate_depth(model, guide, args, idx, kwargs) -> int:
    """How many plates the model and guide nest (what Pyro would otherwise guess and log)."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, idx, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, idx, **kwargs)
    return trace_plate_depth(guide_trace, model_trace)


def trace_plate_depth(*traces) -> int:
    """How many vectorized plates the sample sites of ``traces`` nest (0: none)."""
    dims = [
        frame.dim
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def _find_non_finite_site(model, guide, args, idx, kwargs):
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
def _catch_signals():
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
