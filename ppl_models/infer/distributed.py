r"""Data-parallel SVI on PyTorch's own distributed engine: ``torch.distributed`` + ``DistributedDataParallel``.

Launch ``W`` processes with ``torchrun --nproc-per-node W -m ppl_models fit CONFIG.toml`` (or
``ppl-models fit --nproc W CONFIG.toml``, which runs torchrun's launcher in-process); every process
runs the engine's :class:`~ppl_models.infer.engine.Trainer` with its :class:`DataParallel` option.  Backend:
``gloo`` on CPU, ``nccl`` on CUDA.

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
   * with per-datapoint parameters :math:`\lambda_i` (modules marked
     :class:`ppl_models.families.PerDatapointParams`, e.g. the mean-field guide's tables):
     :math:`S_r` = the rows of the batch that rank ``r`` **owns**: rank ``r`` holds the
     :math:`\lambda_i` of the contiguous block ``i in [start_r, stop_r)`` of the data set only
     (the tables' ``shard``), so the tables are split, not replicated;

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

import datetime
import json
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import pyro
import pyro.poutine as poutine
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ppl_models.families import PerDatapointParams
from ppl_models.runtime import DEVICE_HELP, in_torchrun
from ppl_models.infer.checkpoint import CheckpointError, capture_rng_state, copy_optimizer_state, state_to_cpu

__all__ = [
    "DataParallel",
    "DistributedJobError",
    "ELBOLoss",
    "launch",
    "process_group",
    "rank_and_world",
    "record_errors",
    "resolve_device",
    "shard_bounds",
]

class DistributedJobError(RuntimeError):
    """A process of a multi-process job failed; the job was stopped.  The message names the rank, its exit
    code or signal and, where the process left one, its error."""

    def __init__(self, message: str, exitcode: int):
        super().__init__(message)
        self.exitcode = exitcode


# ----------------------------------------------------------------------------------------- set-up
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


def rank_and_world() -> Tuple[int, int]:
    """This process's rank and the number of processes of its job (``(0, 1)`` outside a process group)."""
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

    ``forward(*args, idx=idx, share=s, masked=False, **kwargs)``: ``args`` the model's data arguments for
    the rows ``idx`` (each ``(batch, ...)``), ``idx`` of shape ``(batch,)``, ``kwargs`` the model's and guide's
    keyword arguments (``num_data``); returns the loss scaled by ``poutine.scale(share)``; ``masked=True``
    masks every site (a zero loss and zero gradients that still take part in the all-reduce).
    """

    def __init__(self, elbo, model, guide, networks: nn.ModuleDict):
        super().__init__()
        self.elbo, self.model, self.guide = elbo, model, guide
        self.networks = networks

    def forward(self, *args, idx: torch.Tensor, share: float = 1.0, masked: bool = False, **kwargs):
        mask = poutine.mask(mask=torch.tensor(False, device=idx.device)) if masked else nullcontext()
        with poutine.scale(scale=share), mask:
            return self.elbo.differentiable_loss(self.model, self.guide, *args, idx, **kwargs)


class _Agreed:
    """What every rank agreed on after the last step (what the engine's loop reads instead of its signal flag)."""

    signum: Optional[int] = None
    deadline: bool = False


# ------------------------------------------------------------------------------ the engine's option
class DataParallel:
    """The engine's data-parallel option: ``Trainer(..., parallel=DataParallel(modules, device))`` trains as one of
    ``W`` data-parallel processes (or as one process on a GPU); see the module docstring.  Construct the trainer
    in every process after :func:`process_group`, with the same arguments (the same seed) everywhere.

    The :class:`~ppl_models.infer.engine.Trainer` consults it where a step or a checkpoint differs from one
    process: the batch's shard (:meth:`shard`), the loss (:meth:`loss_and_grads`, under DDP), the stop and
    signal flags all ranks agree on (:meth:`agreement`), the checkpoint's rows gathered to rank 0
    (:meth:`gather_state`) and each rank's rows of a loaded one (:meth:`rank_state`).

    :param modules: every network of model and guide (``Instance.modules``); per-datapoint tables among them
        (:class:`ppl_models.families.PerDatapointParams`) are split by rank, the others wrapped in DDP.
    :param device: ``"cpu"``, ``"cuda"`` or ``"cuda:K"`` (:func:`resolve_device`).
    """

    def __init__(self, modules: nn.ModuleDict, device: object = "cpu"):
        if modules is None:
            raise ValueError("DataParallel: modules (the instance's networks, Instance.modules) are required")
        self.modules = modules
        self.rank, self.world_size = rank_and_world()
        self.dev = resolve_device(device)
        self.agreed = _Agreed()
        self._local_caught = None
        self._ddp: Optional[nn.Module] = None

    def attach(self, trainer) -> None:
        """Check ``trainer``'s settings, split the per-datapoint tables by rank and move the networks to the
        device (called by the trainer it is given to)."""
        if trainer.step_fn is not None:
            raise ValueError(
                "a strategy with its own step rule (svi-local, svi-inner, semi-amortized) cannot run in several "
                "processes or on a GPU yet; use the mean-field or amortized guide without a strategy, or one CPU process"
            )
        if not hasattr(type(trainer.objective), "differentiable_loss"):
            raise ValueError(
                f"ELBO {trainer.elbo!r} has no differentiable_loss, which DistributedDataParallel needs; "
                "use Trace_ELBO, TraceMeanField_ELBO or TraceEnum_ELBO"
            )
        self.num_data, self.seed = trainer.num_data, trainer.seed
        self.bounds = shard_bounds(self.num_data, self.world_size)
        self._local_modules: List[nn.Module] = []
        networks = nn.ModuleDict()
        for name, module in self.modules.items():
            if isinstance(module, PerDatapointParams):
                self._local_modules.append(module)
            elif any(isinstance(m, PerDatapointParams) for m in module.modules()):
                raise ValueError(f"network {name!r} holds per-datapoint parameters inside; register them apart")
            else:
                networks[name] = module
        if self.owns_rows:
            start, stop = self.bounds[self.rank]
            for module in self._local_modules:
                if module.num_data != self.num_data:
                    raise ValueError(
                        f"per-datapoint guide has {module.num_data} rows but the training data has {self.num_data}"
                    )
                module.shard(start, stop)
        self.modules.to(self.dev)
        self._loss_module = ELBOLoss(trainer.objective, trainer.model, trainer.guide, networks)

    @property
    def owns_rows(self) -> bool:
        """Whether batches are split by row ownership (per-datapoint tables) rather than by position."""
        return bool(self._local_modules) and self.world_size > 1

    @property
    def rng_devices(self) -> list:
        """The CUDA devices whose generators ``torch.random.fork_rng`` must save (none on the CPU)."""
        return [self.dev.index] if self.dev.type == "cuda" else []

    def to_device(self, args) -> tuple:
        return tuple(a.to(self.dev) for a in args)

    def describe(self, batch_size: int) -> str:
        split = "rows each process owns" if self.owns_rows else "positions r, r+W, ... of each batch"
        return (f"data parallel: {self.world_size} processes ({dist.get_backend()}, {self.dev.type}); "
                f"global batch {batch_size} split by {split}")

    # ------------------------------------------------------------------------------ batches
    def setup_rows(self, batch_size: int) -> torch.Tensor:
        """The rows of the set-up step (this rank's own rows when it owns rows)."""
        start, stop = self.bounds[self.rank] if self.owns_rows else (0, self.num_data)
        return torch.arange(start, min(stop, start + batch_size))

    def shard(self, args, idx: torch.Tensor):
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
    def loss(self, args, idx: torch.Tensor, kwargs: dict, share: float = 1.0, masked: bool = False) -> torch.Tensor:
        """The differentiable loss of this rank's rows (through DDP once :meth:`setup_done` wrapped the networks)."""
        module = self._ddp if self._ddp is not None else self._loss_module
        return module(*args, idx=idx, share=share, masked=masked, **kwargs)

    def setup_done(self, named: List[Tuple[str, torch.Tensor]]) -> None:
        """After the engine's set-up registered the parameters ``named``: check that each belongs to a network,
        wrap the networks in DDP, and give ranks other than 0 their own Monte Carlo noise."""
        covered = {id(p) for p in self.modules.parameters()}
        stray = [n for n, p in named if id(p) not in covered]
        if stray and (self.world_size > 1 or self.dev.type != "cpu"):
            raise ValueError(
                f"parameters {stray} are not in any network of the model or guide (a bare pyro.param); with several "
                "processes or a GPU every trained parameter must belong to an nn.Module registered with pyro.module"
            )
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
    def loss_and_grads(self, args, idx: torch.Tensor, kwargs: dict, deadline_passed: bool):
        """One step's loss and gradients on the global batch ``(*args, idx)`` (every rank passes the same batch):
        this rank's shard, its loss, the gradients summed over ranks.  Returns ``(local_args, local_idx, value)``,
        ``value`` the global-batch loss (the number the 1-process engine reports), agreed by every rank in one
        small all-reduce with the signal and deadline flags (:meth:`agreement`)."""
        local_args, local_idx, share, masked = self.shard(args, idx)
        loss = self.loss(local_args, local_idx, kwargs, share=share, masked=masked)
        local = self._local_caught.signum if self._local_caught is not None else None
        stats = torch.tensor([0.0, float(local == signal.SIGINT), float(local == signal.SIGTERM), float(deadline_passed)],
                             dtype=torch.float64, device=loss.device)
        stats[0] = loss.detach().reshape(())
        work = dist.all_reduce(stats, async_op=True) if dist.is_initialized() else None  # overlaps the backward pass
        loss.backward()
        if work is not None:
            work.wait()
        value, sigint, sigterm, deadline_any = stats.tolist()
        self.agreed.signum = signal.SIGINT if sigint else signal.SIGTERM if sigterm else None
        self.agreed.deadline = bool(deadline_any)
        if masked:
            self._empty_local_grads()
        return local_args, local_idx, value

    def agreement(self, caught) -> _Agreed:
        """The flags the engine's loop reads instead of this rank's own signal flag ``caught``: what every rank
        agreed on at the last step (reset here, at the start of a fit)."""
        self._local_caught = caught
        self.agreed = _Agreed()
        return self.agreed

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

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (collective)."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=self.dev)
        dist.all_reduce(tensor)
        return tensor.item() > 0

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

    def _map_rows(self, state: dict, names: List[str], optim, fn: Callable) -> dict:
        """``state`` with each per-datapoint table among the parameters ``names`` replaced by ``fn(name, rows)``,
        and so each tensor of the table's shape in its sparse optimizer state (same order on every rank)."""
        store = pyro.get_param_store()
        opt = optim.optimizers.get("sparse")
        sparse = [id(p) for g in opt.param_groups for p in g["params"]] if opt is not None else []
        local_ids = {id(p) for m in self._local_modules for p in m.parameters()}
        state = {**state, "params": dict(state["params"]), "optimizer": copy_optimizer_state(state["optimizer"])}
        for name in names:
            p = store._params[name]
            if id(p) not in local_ids or name not in state["params"]:
                continue  # not a table; or missing from a checkpoint: the engine names the mismatch
            shape = state["params"][name].shape
            state["params"][name] = fn(name, state["params"][name])
            optimizer = state["optimizer"].get("sparse", {"state": {}})
            per_param = optimizer["state"].get(sparse.index(id(p)), {}) if id(p) in sparse else {}
            for key in sorted(per_param):
                if isinstance(per_param[key], torch.Tensor) and per_param[key].shape == shape:
                    per_param[key] = fn(name, per_param[key])
        return state

    def gather_state(self, state: dict, names: List[str], optim) -> dict:
        """Collective: the engine's ``state`` of this rank completed for a checkpoint.  Rank 0 receives the full
        (1-process format) state, every rank's generator states added; the others a partial one they must not
        write."""
        rng = {"rng": capture_rng_state()}
        if self.dev.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.dev)
        if self.owns_rows:
            state = self._map_rows(state, names, optim, lambda name, rows: self._gather_rows(rows))
        gathered = [rng]
        if self.world_size > 1:
            gathered = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(rng, gathered, dst=0)
        if self.rank == 0:
            state = state_to_cpu(state)  # a checkpoint written on a GPU loads anywhere
            state["distributed"] = {
                "world_size": self.world_size,
                "bounds": [list(b) for b in self.bounds],
                "rng": [g["rng"] for g in gathered],
                **({"cuda_rng": [g["cuda"] for g in gathered]} if "cuda" in gathered[0] else {}),
            }
        return state

    def rank_state(self, state: dict, names: List[str], optim) -> dict:
        """This rank's part of a full checkpoint (every rank loads the same file): its rows of the per-datapoint
        tables and of their optimizer state, and its own generator states when the world size is the same."""
        saved = state.get("distributed")
        if self.owns_rows:
            start, stop = self.bounds[self.rank]

            def own_rows(name, full):
                if full.shape[0] != self.num_data:
                    raise CheckpointError(
                        f"cannot resume: parameter {name!r} has {full.shape[0]} rows in the checkpoint, "
                        f"expected one per datapoint ({self.num_data})"
                    )
                return full[start:stop]

            state = self._map_rows(state, names, optim, own_rows)
        if saved is not None and saved.get("world_size") == self.world_size:
            state = {**state, "rng": saved["rng"][self.rank]}
            if self.dev.type == "cuda" and "cuda_rng" in saved:
                torch.cuda.set_rng_state(saved["cuda_rng"][self.rank], self.dev)
        elif self.rank > 0:  # its own fresh Monte Carlo noise, as at the start, moved on by the step
            pyro.set_rng_seed((self.seed + 1_000_003 * self.rank + 7919 * state["step"]) % 2**32)
            state = {**state, "rng": capture_rng_state()}
        elif self.world_size > 1:
            found = saved.get("world_size") if saved else 1
            print(
                f"note: resuming a {found}-process checkpoint with {self.world_size} processes: parameters, optimizer "
                "state and data order continue; the Monte Carlo noise of ranks other than 0 is drawn afresh",
                file=sys.stderr,
            )
        return state

    def agree_on_checkpoint(self, chosen: Optional[Path]) -> Optional[Path]:
        """Rank 0's choice of checkpoint to resume from, on every rank, which must see the file."""
        if self.world_size > 1:
            box = [None if chosen is None else str(chosen)]
            dist.broadcast_object_list(box, src=0)
            chosen = None if box[0] is None else Path(box[0])
        if chosen is not None and not chosen.is_file():
            raise CheckpointError(
                f"rank {self.rank} cannot see checkpoint {chosen} chosen by rank 0: the run directory must be on a "
                "file system every node shares"
            )
        return chosen


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
