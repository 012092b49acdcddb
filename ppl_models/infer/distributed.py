r"""Data-parallel SVI on PyTorch's own distributed engine: ``torch.distributed`` + ``DistributedDataParallel``.

Launch ``W`` processes with ``torchrun --nproc-per-node W -m ppl_models fit CONFIG.toml`` (or
``ppl-models fit --nproc W CONFIG.toml``, which runs torchrun's launcher in-process); every process
runs :class:`DistributedTrainer`.  Backend: ``gloo`` on CPU, ``nccl`` on CUDA.

**One step, exactly the 1-process step.**  The 1-process engine takes the global batch
:math:`S` (:math:`|S| = B` rows of the epoch's permutation) and minimizes

.. math::  L = \frac{N}{B} \sum_{i \in S} \ell_i,
           \qquad \ell_i = -\big(\log p(x_i, z_i) - \log q(z_i \mid x_i)\big),\ z_i \sim q,

where the data plate (size :math:`N`, subsample :math:`S`) supplies the factor :math:`N/B`.  With
:math:`W` processes:

1. every rank draws the **same** permutation and the same global batch (the data generator is seeded
   identically and advanced identically on all ranks: shuffling and dynamic binarization of the
   whole batch), then keeps its shard :math:`S_r \subseteq S`:

   * models without per-datapoint parameters: :math:`S_r` = positions ``r, r + W, r + 2W, ...`` of
     the batch — what ``DistributedSampler(shuffle=True)`` + a per-rank ``DataLoader(batch_size=B/W)``
     give for global batch ``b`` (``perm[rank::W]`` cut into chunks of ``B/W``);
   * with per-datapoint parameters :math:`\lambda_i` (:class:`ppl_models.guides.mean_field.LocalParams`):
     :math:`S_r` = the rows of the batch that rank ``r`` **owns**: rank ``r`` holds the
     :math:`\lambda_i` of the contiguous block ``i in [start_r, stop_r)`` of the data set only
     (``LocalParams.shard``), so the tables are split, not replicated;

2. rank ``r`` computes :math:`L_r = \frac{N}{B} \sum_{i \in S_r} \ell_i`: the plate gives
   :math:`N / |S_r|`, and ``poutine.scale(|S_r| / B)`` (this rank's share of the global batch)
   the rest, so :math:`\sum_r L_r = L` for shards of any sizes;
3. the networks' gradients are **summed** over ranks by DDP's all-reduce (a sum communication hook:
   DDP's default averages), so every rank holds :math:`\nabla L`; a :math:`\lambda_i` lives on one rank
   only and its gradient :math:`\frac{N}{B} \nabla \ell_i` is already exact there (it is not all-reduced);
4. every rank steps the same optimizer on the same gradients: the networks stay identical on all ranks.

Hence, up to floating-point summation order, a ``W``-process run reproduces the 1-process run with
the same global batch and seed wherever the gradient is a function of the batch alone (e.g. enumerated
discrete latents, or a guide equal to the posterior).  With Monte Carlo noise the ranks draw their own
noise (rank ``r`` seeds its sampling generators from ``seed`` and ``r``; rank 0 exactly as the
1-process run), so the runs agree in distribution, not draw by draw.  A rank whose shard is empty
(e.g. a last batch smaller than ``W``) still joins the all-reduce with a masked row (zero gradient).

**Checkpoints.**  Collective: the :math:`\lambda` shards (and their sparse optimizer state) are
gathered to rank 0, which writes one checkpoint atomically, in the 1-process format
(:mod:`ppl_models.infer.checkpoint`) plus every rank's random-generator states; a 1-process
:class:`~ppl_models.infer.engine.Trainer` (``ppl-models evaluate``) reads it unchanged.  To resume,
rank 0 picks the newest readable checkpoint and every rank loads that file (the run directory must be
on a file system all nodes see) and takes its rows: the run continues exactly as the uninterrupted
one (same world size).  SIGINT/SIGTERM, the time limit and non-finite losses are agreed by all ranks
at each step (one small all-reduce), so all ranks save and stop together.  A rank that dies ends the
job: its peers' next collective fails and torchrun's agent stops the others; checkpoints are only
ever replaced by atomic renames, so the last one stays intact.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import pyro
import pyro.poutine as poutine
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ppl_models.infer.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from ppl_models.infer.engine import NonFiniteLossError, Trainer, _plate_depth
from ppl_models.infer.optim import make_optimizer

__all__ = [
    "DEVICE_HELP",
    "DistributedJobError",
    "DistributedTrainer",
    "ELBOLoss",
    "fit_experiment",
    "in_torchrun",
    "launch",
    "process_group",
    "record_errors",
    "resolve_device",
    "shard_bounds",
]

DEVICE_HELP = "'cpu', 'cuda' (each process uses the GPU of its local rank) or 'cuda:K' (one process)"


class DistributedJobError(RuntimeError):
    """A process of a multi-process job failed; the job was stopped.  The message names the rank, its exit
    code or signal and, where the process left one, its error."""

    def __init__(self, message: str, exitcode: int):
        super().__init__(message)
        self.exitcode = exitcode


# ----------------------------------------------------------------------------------------- set-up
def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets ``RANK``/``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def record_errors(fn: Callable) -> Callable:
    """``fn`` wrapped as torch's ``errors.record`` wraps a job process's entry point (an uncaught error is written
    to the launcher's error file, which :func:`launch` reports), but the file is written atomically: torch's
    handler writes it in place, and its launcher, reading the file of one process while that process is still
    writing it (a peer was just killed), fails with a ``JSONDecodeError`` instead of naming the failure."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

    class _AtomicErrorHandler(ErrorHandler):
        def record_exception(self, e: BaseException) -> None:
            path = self._get_error_file_path()
            if not path:
                return
            data = {"message": {"message": f"{type(e).__name__}: {e}",
                                "extraInfo": {"py_callstack": traceback.format_exc(),
                                              "timestamp": str(int(time.time()))}}}
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as fp:
                json.dump(data, fp)
            os.replace(tmp, path)

    return record(fn, error_handler=_AtomicErrorHandler())


def _rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device this process trains on: ``"cpu"``, ``"cuda"`` (the GPU of ``LOCAL_RANK``) or ``"cuda:K"``.
    Asking for CUDA where there is none is one clear error."""
    name = "cpu" if device is None else str(device)
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: expected {DEVICE_HELP}, received {name!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device: expected {DEVICE_HELP}, received {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r}: no CUDA GPU is available to this process "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}); use device 'cpu'"
        )
    if dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(dev)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


@contextmanager
def process_group(device: str | torch.device | None = "cpu", timeout_s: float = 1800.0):
    """Join the job torchrun started (``env://``: ``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``...), with ``gloo``
    on CPU and ``nccl`` on CUDA; leave it on exit.  Outside torchrun (or if a group exists) nothing is done.
    Yields this process's device."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not in_torchrun() or dist.is_initialized():
        yield dev
        return
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    try:
        yield dev
    finally:
        dist.destroy_process_group()


def shard_bounds(num_data: int, world_size: int) -> List[Tuple[int, int]]:
    """The contiguous block of datapoints ``[start, stop)`` each rank owns (sizes differ by at most one)."""
    if world_size > num_data:
        raise ValueError(f"{world_size} processes but only {num_data} datapoints: each process must own at least one")
    base, extra = divmod(num_data, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        stop = start + base + (r < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _sum_allreduce_hook(state, bucket):
    """DDP communication hook: all-reduce the gradient bucket by SUM (each rank's loss is its part of the
    global-batch loss, so the parts' gradients add up; DDP's default would average them)."""
    fut = dist.all_reduce(bucket.buffer(), group=state, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class ELBOLoss(nn.Module):
    r"""The differentiable -ELBO of a batch as an ``nn.Module``, what DistributedDataParallel wraps.

    Pyro's ``Trace_ELBO()(model, guide)`` is such a module for ``PyroModule`` models; the package's models are
    plain functions with their networks bound, so this module holds the networks (its parameters: what DDP
    all-reduces) and calls ``elbo.differentiable_loss``.  Per-datapoint tables are deliberately not among
    its parameters: each lives on the one rank that owns its rows.

    ``forward(*args, idx=idx, num_data=N, share=s, masked=False)``: ``args`` the model's data arguments for
    the rows ``idx`` (each ``(batch, ...)``), ``idx`` of shape ``(batch,)``; returns the loss scaled by
    ``poutine.scale(share)``; ``masked=True`` masks every site (a zero loss and zero gradients that still
    take part in the all-reduce).
    """

    def __init__(self, elbo, model, guide, networks: nn.ModuleDict):
        super().__init__()
        self.elbo, self.model, self.guide = elbo, model, guide
        self.networks = networks

    def forward(self, *args, idx: torch.Tensor, num_data: int, share: float = 1.0, masked: bool = False):
        mask = poutine.mask(mask=torch.tensor(False, device=idx.device)) if masked else nullcontext()
        with poutine.scale(scale=share), mask:
            return self.elbo.differentiable_loss(self.model, self.guide, *args, idx, num_data=num_data)


class _Agreed:
    """What every rank agreed on after the last step (a stand-in for the engine's signal flag)."""

    signum: Optional[int] = None
    deadline: bool = False


# ------------------------------------------------------------------------------------- the trainer
@dataclass
class DistributedTrainer(Trainer):
    """:class:`~ppl_models.infer.engine.Trainer` for one of ``W`` data-parallel processes (or one process on a
    GPU); see the module docstring.  Construct it in every process after :func:`process_group`, with the
    same arguments (the same seed) everywhere.

    :param modules: every network of model and guide (``Instance.modules``); ``LocalParams`` among them
        are sharded by rank, the others wrapped in DDP.
    :param device: ``"cpu"``, ``"cuda"`` or ``"cuda:K"`` (:func:`resolve_device`).
    """

    modules: Optional[nn.ModuleDict] = None
    device: object = "cpu"

    def __post_init__(self):
        super().__post_init__()
        from ppl_models.guides.mean_field import LocalParams

        if self.modules is None:
            raise ValueError("DistributedTrainer: modules (the instance's networks, Instance.modules) are required")
        if self.step_fn is not None:
            raise ValueError(
                "a strategy with its own step rule (svi-inner, semi-amortized) cannot run in several processes "
                "or on a GPU yet; use the strategies svi-local or amortized, or one CPU process"
            )
        if not self._differentiable:
            raise ValueError(
                f"ELBO {self.elbo!r} has no differentiable_loss, which DistributedDataParallel needs; "
                "use Trace_ELBO, TraceMeanField_ELBO or TraceEnum_ELBO"
            )
        self.rank, self.world_size = _rank_world()
        self.dev = resolve_device(self.device)
        if self.rank != 0:
            self.progress = False
        self.bounds = shard_bounds(self.num_data, self.world_size)
        self._local_modules: List[nn.Module] = []
        networks = nn.ModuleDict()
        for name, module in self.modules.items():
            if isinstance(module, LocalParams):
                self._local_modules.append(module)
            elif any(isinstance(m, LocalParams) for m in module.modules()):
                raise ValueError(f"network {name!r} holds per-datapoint parameters inside; register them apart")
            else:
                networks[name] = module
        if self._local_modules and self.world_size > 1:
            start, stop = self.bounds[self.rank]
            for module in self._local_modules:
                if module.num_data != self.num_data:
                    raise ValueError(
                        f"per-datapoint guide has {module.num_data} rows but the training data has {self.num_data}"
                    )
                module.shard(start, stop)
        self.modules.to(self.dev)
        self._loss_module = ELBOLoss(self._elbo, self.model, self.guide, networks)
        self._ddp: Optional[nn.Module] = None
        self._agreed = _Agreed()
        self._local_caught = None
        self._local_ids: set = set()

    @classmethod
    def from_trainer(cls, trainer: Trainer, **kwargs) -> "DistributedTrainer":
        """The same settings as ``trainer`` (e.g. :meth:`ppl_models.app.experiment.Experiment.trainer`'s)."""
        fields = {f.name: getattr(trainer, f.name) for f in dataclasses.fields(Trainer) if f.init}
        return cls(**{**fields, **kwargs})

    @property
    def owns_rows(self) -> bool:
        """Whether batches are split by row ownership (per-datapoint tables) rather than by position."""
        return bool(self._local_modules) and self.world_size > 1

    # ------------------------------------------------------------------------------ batches
    def _shard(self, args, idx: torch.Tensor):
        """This rank's rows of the global batch: ``(args, idx, share, masked)`` on this rank's device."""
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor) or a.dim() == 0 or a.shape[0] != idx.shape[0]:
                got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(
                    f"data argument {i}: expected a tensor with the batch ({idx.shape[0]} rows) first, received {got}"
                )
        if self.world_size == 1:
            pos = None
        elif self.owns_rows:
            start, stop = self.bounds[self.rank]
            pos = ((idx >= start) & (idx < stop)).nonzero().squeeze(-1)
        else:
            pos = torch.arange(idx.shape[0])[self.rank :: self.world_size]
        if pos is not None and pos.numel() == 0:  # nothing here this step: one masked row joins the all-reduce
            row = torch.tensor([self.bounds[self.rank][0]]) if self.owns_rows else idx[:1]
            args, idx, share, masked = tuple(a[:1] for a in args), row, 1.0, True
        else:
            share = 1.0 if pos is None else pos.numel() / idx.shape[0]
            if pos is not None:
                args, idx = tuple(a[pos] for a in args), idx[pos]
            masked = False
        nb = self.dev.type == "cuda"
        return tuple(a.to(self.dev, non_blocking=nb) for a in args), idx.to(self.dev, non_blocking=nb), share, masked

    # ------------------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        """As the engine's set-up (register parameters, find the sparse ones, build the optimizer; no generator
        touched), on this rank's own rows; then wrap the networks in DDP."""
        if self._optim is not None:
            return
        if self.owns_rows:
            start, stop = self.bounds[self.rank]
            idx = torch.arange(start, min(stop, start + self.batch_size))
        else:
            idx = torch.arange(min(self.batch_size, self.num_data))
        args = tuple(a.to(self.dev) for a in self.train.batch(idx, torch.Generator().manual_seed(self.seed)))
        idx = idx.to(self.dev)
        devices = [self.dev.index] if self.dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            depth = _plate_depth(self.model, self.guide, args, idx, self._loss_kwargs())
            for elbo in (self._elbo, self._valid_elbo):
                if elbo.max_plate_nesting == float("inf"):
                    elbo.max_plate_nesting = depth + int(elbo.vectorize_particles and elbo.num_particles > 1)
            loss = self._loss_module(*args, idx=idx, num_data=self.num_data)
            value = loss.item()
            if math.isfinite(value):
                loss.backward()
        if not math.isfinite(value):
            self._raise_non_finite(value, args, idx, during="set-up")
        store = pyro.get_param_store()
        names = sorted(store.keys())
        if not names:
            raise ValueError("model and guide have no parameters to train (no pyro.param or pyro.module)")
        named = [(n, store._params[n]) for n in names]
        covered = {id(p) for p in self.modules.parameters()}
        stray = [n for n, p in named if id(p) not in covered]
        if stray and (self.world_size > 1 or self.dev.type != "cpu"):
            raise ValueError(
                f"parameters {stray} are not in any network of the model or guide (a bare pyro.param); with several "
                "processes or a GPU every trained parameter must belong to an nn.Module registered with pyro.module"
            )
        sparse_ids = {id(p) for _, p in named if p.grad is not None and p.grad.is_sparse}
        self._local_ids = {id(p) for m in self._local_modules for p in m.parameters()}
        for _, p in named:
            p.grad = None
        self._names = names
        self._optim = make_optimizer(self.optimizer, named, lr=self.lr, sparse_ids=sparse_ids, **self.optimizer_kwargs)
        if dist.is_initialized() and any(p.requires_grad for p in self._loss_module.parameters()):
            self._ddp = DistributedDataParallel(
                self._loss_module,
                device_ids=[self.dev.index] if self.dev.type == "cuda" else None,
                forward_sync_buffers=False,  # the networks' buffers are constants: synced once, at the start
            )
            self._ddp.register_comm_hook(None, _sum_allreduce_hook)
        if self.rank > 0:
            # Each rank draws its own Monte Carlo noise; rank 0 keeps the 1-process run's streams.
            # (On resume the saved per-rank states replace these.)
            pyro.set_rng_seed((self.seed + 1_000_003 * self.rank) % 2**32)

    # ------------------------------------------------------------------------------ one step
    def train_step(self, args, idx) -> float:
        """One step on the global batch ``(*args, idx)`` (every rank passes the same batch); returns the
        global-batch loss, the same number the 1-process engine reports."""
        if self._optim is None:
            self._setup()
        local_args, local_idx, share, masked = self._shard(args, idx)
        with pyro.validation_enabled(self.validate == "always" or self.step == 0):
            self._optim.zero_grad()
            module = self._ddp if self._ddp is not None else self._loss_module
            loss = module(*local_args, idx=local_idx, num_data=self.num_data, share=share, masked=masked)
            agreeing = self._start_agree(loss.detach())  # overlaps the backward pass and its all-reduce
            loss.backward()
            value = self._finish_agree(*agreeing)
            if not math.isfinite(value):  # every rank sees the same sum: all stop here, before any update
                self._raise_non_finite(value, local_args, local_idx)
            if masked:
                self._empty_local_grads()
            self._optim.step()
        self.step += 1
        return value

    def _start_agree(self, loss: torch.Tensor):
        """Start the all-reduce of this step's loss part with the signal and deadline flags (async)."""
        local = self._local_caught.signum if self._local_caught is not None else None
        deadline = self._deadline is not None and time.perf_counter() >= self._deadline
        stats = torch.tensor(
            [0.0, float(local == signal.SIGINT), float(local == signal.SIGTERM), float(deadline)],
            dtype=torch.float64,
            device=loss.device,
        )
        stats[0] = loss.reshape(())
        work = dist.all_reduce(stats, async_op=True) if dist.is_initialized() else None
        return work, stats

    def _finish_agree(self, work, stats: torch.Tensor) -> float:
        """What all ranks agreed on: sets the signal and deadline flags; returns the global-batch loss."""
        if work is not None:
            work.wait()
        value, sigint, sigterm, deadline_any = stats.tolist()
        self._agreed.signum = signal.SIGINT if sigint else signal.SIGTERM if sigterm else None
        self._agreed.deadline = bool(deadline_any)
        return value

    def _empty_local_grads(self) -> None:
        """After a masked step: an empty sparse gradient for each per-datapoint table, so that its optimizer
        counts the step (as the 1-process run's does) but moves no row."""
        for module in self._local_modules:
            for p in module.parameters():
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = torch.sparse_coo_tensor(
                        torch.zeros(1, 0, dtype=torch.long, device=p.device),
                        torch.zeros((0, *p.shape[1:]), dtype=p.dtype, device=p.device),
                        p.shape,
                        check_invariants=True,
                    )
                elif p.grad is not None:
                    p.grad = None

    def _done(self) -> bool:
        if self.max_steps is not None and self.step >= self.max_steps:
            return True
        return self._agreed.deadline

    def _run_epoch(self, caught) -> None:
        # The engine's loop reads the flag this step's all-reduce agreed on, never a rank's own signal.
        self._local_caught = caught
        super()._run_epoch(self._agreed)

    def fit(self, resume: bool = False):
        self._agreed = _Agreed()
        return super().fit(resume=resume)

    # ------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_elbo(self) -> float:
        """ELBO per datapoint on ``valid``, as the engine computes it (every rank the same, on its device)."""
        n = int(self.valid.num_data)
        total = 0.0
        devices = [self.dev.index] if self.dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + self.epoch)
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            for start in range(0, n, self.valid_batch_size):
                idx = torch.arange(start, min(n, start + self.valid_batch_size))
                args = tuple(a.to(self.dev) for a in self.valid.batch(idx, gen))
                total += float(self._valid_elbo.loss(self.model, self.guide, *args, None))
        return -total / n

    # ------------------------------------------------------------------------------ checkpoints
    def _gather_rows(self, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """Rank 0: the full table from every rank's block of rows (collective); other ranks: ``None``."""
        if self.world_size == 1:
            return tensor.detach().cpu().clone()
        sizes = [stop - start for start, stop in self.bounds]
        padded = tensor.detach().new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor.detach()
        parts = [torch.empty_like(padded) for _ in sizes] if self.rank == 0 else None
        dist.gather(padded, parts, dst=0)
        if self.rank != 0:
            return None
        return torch.cat([part[:n] for part, n in zip(parts, sizes)]).cpu()

    def _gather_object(self, obj) -> Optional[list]:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def _local_state_entries(self):
        """``(name, param, sparse_optimizer_index)`` of each per-datapoint table."""
        store = pyro.get_param_store()
        sparse_names = [n for n in self._names if id(store._params[n]) in self._optim_sparse_ids()]
        for name in self._names:
            p = store._params[name]
            if id(p) in self._local_ids:
                yield name, p, (sparse_names.index(name) if name in sparse_names else None)

    def _optim_sparse_ids(self) -> set:
        opt = self._optim.optimizers.get("sparse")
        return {id(p) for g in opt.param_groups for p in g["params"]} if opt is not None else set()

    def state_dict(self) -> dict:
        """Collective: every rank calls it; rank 0 receives the full (1-process format) state, the others a
        partial one they must not write."""
        state = super().state_dict()
        rng = {"rng": capture_rng_state()}
        if self.dev.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.dev)
        if self.world_size > 1 and self._local_modules:
            state["optimizer"] = _copy_optimizer_state(state["optimizer"])  # its per-parameter dicts are live
            for name, p, j in self._local_state_entries():
                full = self._gather_rows(p)
                if self.rank == 0:
                    state["params"][name] = full
                if j is None:
                    continue
                per_param = state["optimizer"]["sparse"]["state"].get(j, {})
                for key in sorted(per_param):
                    value = per_param[key]
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        full = self._gather_rows(value)
                        if self.rank == 0:
                            per_param[key] = full
        gathered = self._gather_object(rng)
        if self.rank == 0:
            state = _to_cpu(state)  # a checkpoint written on a GPU loads anywhere
            state["distributed"] = {
                "world_size": self.world_size,
                "bounds": [list(b) for b in self.bounds],
                "rng": [g["rng"] for g in gathered],
                **({"cuda_rng": [g["cuda"] for g in gathered]} if "cuda" in gathered[0] else {}),
            }
        return state

    def save(self) -> Optional[Path]:
        """Collective; rank 0 writes the checkpoint atomically (and ``history.json``)."""
        if self.checkpoint_dir is None:
            return None
        store = pyro.get_param_store()
        bad = [n for n in self._names if not bool(torch.isfinite(store._params[n]).all())]
        if self.world_size > 1:
            flag = torch.tensor([float(bool(bad))], device=self.dev)
            dist.all_reduce(flag)
            any_bad = flag.item() > 0
        else:
            any_bad = bool(bad)
        if any_bad:
            raise NonFiniteLossError(
                f"not saving a checkpoint at step {self.step}: non-finite parameters "
                f"{', '.join(bad) if bad else 'on another rank'}",
                step=self.step,
                site=None,
                checkpoint=self._latest_checkpoint_path(),
            )
        state = self.state_dict()
        if self.rank != 0:
            return checkpoint_path(self.checkpoint_dir, self.step)
        path = save_checkpoint(self.checkpoint_dir, state, keep_last=self.keep_last)
        self._write_history()
        return path

    def load_state_dict(self, state: dict) -> None:
        """Every rank loads the same full checkpoint and keeps its rows and its own random-generator states."""
        self._setup()
        state = dict(state)
        saved = state.get("distributed")
        params = dict(state["params"])
        if self.world_size > 1 and self._local_modules:
            start, stop = self.bounds[self.rank]
            optimizer = _copy_optimizer_state(state["optimizer"])
            for name, p, j in self._local_state_entries():
                if name not in params:
                    continue  # the engine names the mismatch
                full = params[name]
                if full.shape[0] != self.num_data:
                    raise CheckpointError(
                        f"cannot resume: parameter {name!r} has {full.shape[0]} rows in the checkpoint, "
                        f"expected one per datapoint ({self.num_data})"
                    )
                params[name] = full[start:stop]
                if j is not None and "sparse" in optimizer:
                    per_param = optimizer["sparse"]["state"].get(j, {})
                    for key, value in list(per_param.items()):
                        if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(full.shape):
                            per_param[key] = value[start:stop]
            state["optimizer"] = optimizer
        state["params"] = params
        same_world = saved is not None and saved.get("world_size") == self.world_size
        if same_world:
            state["rng"] = saved["rng"][self.rank]
        elif self.world_size > 1 and self.rank == 0:
            found = saved.get("world_size") if saved else 1
            print(
                f"note: resuming a {found}-process checkpoint with {self.world_size} processes: parameters, optimizer "
                "state and data order continue; the Monte Carlo noise of ranks other than 0 is drawn afresh",
                file=sys.stderr,
            )
        super().load_state_dict(state)
        if not same_world and self.rank > 0:
            pyro.set_rng_seed((self.seed + 1_000_003 * self.rank + 7919 * self.step) % 2**32)
        if same_world and self.dev.type == "cuda" and "cuda_rng" in saved:
            torch.cuda.set_rng_state(saved["cuda_rng"][self.rank], self.dev)

    def resume(self) -> Optional[Path]:
        """Rank 0 picks the newest readable checkpoint; every rank loads that one."""
        if self.checkpoint_dir is None:
            raise ValueError("resume needs a run_dir")
        chosen = None
        if self.rank == 0:
            for path in reversed(list_checkpoints(self.checkpoint_dir)):
                try:
                    load_checkpoint(path)
                except CheckpointError as exc:
                    print(f"skipping unreadable checkpoint: {exc}", file=sys.stderr)
                    continue
                chosen = str(path)
                break
        if self.world_size > 1:
            box = [chosen]
            dist.broadcast_object_list(box, src=0)
            chosen = box[0]
        if chosen is None:
            return None
        path = Path(chosen)
        if not path.is_file():
            raise CheckpointError(
                f"rank {self.rank} cannot see checkpoint {path} chosen by rank 0: the run directory must be on a "
                "file system every node shares"
            )
        self.load_state_dict(load_checkpoint(path))
        return path


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _copy_optimizer_state(state: dict) -> dict:
    """A copy of an optimizer state dict deep enough to replace per-parameter tensors."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict) and "state" in value:
            out[key] = {**value, "state": {k: dict(v) for k, v in value["state"].items()}}
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------- experiments
def fit_experiment(experiment, *, resume: bool = False, evaluate: bool = True, num_samples: Optional[int] = None,
                   device: Optional[str] = None):
    """:meth:`ppl_models.app.experiment.Experiment.fit` on ``W`` processes (run in every process torchrun started)
    or on a GPU.  Rank 0 writes the run directory; after training it alone evaluates the newest checkpoint
    (in one process).  Returns ``(FitResult, metrics or None)``; ``metrics`` is ``None`` on other ranks."""
    device = device if device is not None else getattr(experiment.config.train, "device", "cpu")
    with process_group(device) as dev:
        rank, world = _rank_world()
        if rank == 0:
            experiment._write_config(resume)
        splits = experiment.load_data()
        instance = experiment.build(splits["train"].num_data)
        per_datapoint = experiment.is_per_datapoint(instance)
        if rank == 0 and per_datapoint and experiment.config.train.validate:
            print(
                "note: the per-datapoint guide has no parameters for validation data; validation ELBO skipped",
                file=sys.stderr,
            )
        base = experiment.trainer(splits, instance)
        if rank == 0 and getattr(base, "fast_path", False):
            print("note: the fast path is not used with several processes or a GPU; Pyro's ELBO runs", file=sys.stderr)
        trainer = DistributedTrainer.from_trainer(base, modules=instance.modules, device=dev)
        if rank == 0 and world > 1:
            split = "rows each process owns" if trainer.owns_rows else "positions r, r+W, ... of each batch"
            print(f"data parallel: {world} processes ({dist.get_backend()}, {dev.type}); "
                  f"global batch {trainer.batch_size} split by {split}", file=sys.stderr)
        result = trainer.fit(resume=resume)
        if rank == 0 and experiment.config.output.plots:
            from ppl_models.tasks.plots import plot_elbo_curves

            plot_elbo_curves(result.history, experiment.run_dir / "elbo.png",
                             title=f"{instance.model_name} / {instance.guide_name}")
    metrics = None
    if rank == 0 and evaluate:
        metrics = experiment.evaluate(num_samples=num_samples)
    return result, metrics


# ------------------------------------------------------------------------------------- launcher
def launch(nproc: int, args: Sequence[str], *, module: Optional[str] = None, script: Optional[str] = None,
           torchrun_args: Sequence[str] = ()) -> None:
    """Run ``nproc`` processes on this machine as ``torchrun --standalone --nproc-per-node nproc`` does
    (torch's own launcher, ``torch.distributed.run``, in this process: it is the job's agent).

    The processes run ``python -m module args...`` or ``python script args...``.  If one fails the others
    are stopped and :class:`DistributedJobError` names the first failure (rank, exit code or signal, error).
    """
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"nproc: expected a positive integer, received {nproc!r}")
    if (module is None) == (script is None):
        raise ValueError("launch: give exactly one of module= or script=")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    target = ["--module", module] if module is not None else [script]
    parsed = torchrun.parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", *torchrun_args, *target, *args]
    )
    try:
        torchrun.run(parsed)
    except ChildFailedError as exc:
        raise _job_error(exc) from None
    except SignalException as exc:  # the launcher itself got SIGINT/SIGTERM; it passed it on to the processes
        name = signal.Signals(exc.sigval).name
        raise DistributedJobError(f"the launcher received {name} and stopped the processes", 128 + int(exc.sigval)) from None


def _job_error(exc) -> DistributedJobError:
    """One message for a failed job: the likely root cause first, then the other processes that failed.

    The root cause is a process killed by a signal other than the SIGTERM/SIGINT the launcher sends when it
    stops the rest (SIGKILL, e.g. out of memory; its peers then fail on their next collective), else one
    that recorded a Python error, else the first failure torch's launcher saw."""
    failures = exc.failures
    stopping = (-signal.SIGTERM, -signal.SIGINT)
    killed = [r for r, f in failures.items() if f.exitcode < 0 and f.exitcode not in stopping]
    errored = [r for r, f in failures.items() if f.exitcode > 0 and isinstance(f.message, dict)]
    root = min(killed) if killed else min(errored) if errored else exc.get_first_failure()[0]

    def describe(rank, failure):
        code = failure.exitcode
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) was killed by {name}", 128 - code
        # A Python error recorded by the process (torch's error file) is shown; a bare exit status says enough.
        msg = failure.message.get("message", "") if isinstance(failure.message, dict) else ""
        detail = f" ({msg.splitlines()[0][:300]})" if msg else ""
        return f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) exited with status {code}{detail}", code

    text, status = describe(root, failures[root])
    others = [describe(r, f)[0] for r, f in sorted(failures.items()) if r != root]
    then = f"; then {'; '.join(others)}" if others else ""
    return DistributedJobError(f"process of {text}{then}; the job was stopped", status)
