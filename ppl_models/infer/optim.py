"""Optimizers chosen by name, with sparse per-datapoint parameters handled apart.

Parameters are split in two groups:

* dense parameters (networks, global ``pyro.param`` s) get the named torch optimizer
  (Adam uses the fused CPU/GPU kernel when torch supports it for the parameters);
* sparse parameters — the per-datapoint :math:`\\lambda_i` tables of
  :mod:`ppl_models.guides.mean_field`, ``nn.Embedding(sparse=True)`` weights — get the sparse
  counterpart (``SparseAdam`` for Adam), which reads and writes only the rows of the batch.

Per-step cost matters for small networks (the engine's hot path): :meth:`Optimizer.zero_grad` sets
the gradients to ``None`` directly, and fused Adam/AdamW call torch's fused kernel directly once their state
exists (:class:`_FusedAdamStep`): the same kernel on the same tensors as ``torch.optim.Adam(fused=True).step()``
— bitwise the same update — without its per-call grouping and step-counter bookkeeping (measured on the VAE
784-400-20: 0.1-0.4 ms of a 5-8 ms step).

A learning-rate schedule (:mod:`ppl_models.infer.schedules`) sets :attr:`Optimizer.lr_factor` before each step:
every group, dense and sparse, steps at ``lr_factor`` times its own lr, as ``torch.optim.lr_scheduler.LambdaLR``
would set it; the groups keep their base lr (in the checkpoint too), so a step rule that sets a group's lr itself
(``svi-local``'s ``local_lr``) is scheduled as well.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

from ppl_models.registry import UnknownNameError

__all__ = ["OPTIMIZER_NAMES", "Optimizer", "make_optimizer", "sparse_parameter_ids"]

# name -> (dense optimizer class, sparse optimizer class or None)
_OPTIMIZERS = {
    "adam": (torch.optim.Adam, torch.optim.SparseAdam),
    "adamw": (torch.optim.AdamW, torch.optim.SparseAdam),
    "sgd": (torch.optim.SGD, torch.optim.SGD),
    "adagrad": (torch.optim.Adagrad, torch.optim.Adagrad),
    "rmsprop": (torch.optim.RMSprop, None),
}
OPTIMIZER_NAMES = tuple(_OPTIMIZERS)
_FUSABLE = ("adam", "adamw", "sgd", "adagrad")


def sparse_parameter_ids(modules: Iterable[nn.Module]) -> set:
    """ids of the weights of every ``nn.Embedding(sparse=True)`` inside ``modules``."""
    ids = set()
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.Embedding) and sub.sparse:
                ids.add(id(sub.weight))
    return ids


class _FusedAdamStep:
    """``opt.step()`` of a ``torch.optim.Adam``/``AdamW`` with ``fused=True``, one parameter group, every
    parameter with a dense gradient and its state already initialized: ``torch._fused_adam_`` (``_fused_adamw_``)
    called directly on lists built once.  The step counters become views of one tensor, so one ``add_`` counts
    them all (a checkpoint stores them as usual).  Returns ``False`` when torch's own ``step`` must run
    (the first step, a missing gradient, AMSGrad).  Learning rate and betas are read from the group every call,
    so schedulers still apply."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        self._key = None

    def _prepare(self, params) -> bool:
        states = [self.opt.state.get(p) for p in params]
        if any(not s or "exp_avg" not in s for s in states):
            return False  # torch's first step initializes the state
        if self._state_key(states) != self._key:  # new state (first time, or after load_state_dict)
            steps = torch.stack([s["step"].detach().reshape(()) for s in states])
            for i, s in enumerate(states):
                s["step"] = steps[i]
            self._steps, self._step_list = steps, [s["step"] for s in states]
            self._exp_avgs = [s["exp_avg"] for s in states]
            self._exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            self._key = self._state_key(states)
        return True

    @staticmethod
    def _state_key(states) -> tuple:
        return tuple(id(s[k]) for s in states for k in ("exp_avg", "exp_avg_sq", "step"))

    def __call__(self) -> bool:
        groups = self.opt.param_groups
        if len(groups) != 1:
            return False
        group = groups[0]
        params = group["params"]
        if (group.get("amsgrad") or group.get("capturable") or group.get("differentiable")
                or any(p.grad is None or p.grad.is_sparse for p in params) or not self._prepare(params)):
            return False
        beta1, beta2 = group["betas"]
        decoupled = group.get("decoupled_weight_decay", isinstance(self.opt, torch.optim.AdamW))
        fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
        with torch.no_grad():
            self._steps.add_(1)
            fused(params, [p.grad for p in params], self._exp_avgs, self._exp_avg_sqs, [], self._step_list,
                  amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                  eps=group["eps"], maximize=group["maximize"], grad_scale=None, found_inf=None)
        return True


class Optimizer:
    """One optimizer over named parameters, dense and sparse groups stepped together."""

    def __init__(self, name: str, named_params: List[Tuple[str, torch.Tensor]], sparse_ids: set, lr: float, **kwargs):
        if name not in _OPTIMIZERS:
            raise UnknownNameError("optimizer", name, _OPTIMIZERS)
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr: expected a positive number, received {lr!r}")
        dense_cls, sparse_cls = _OPTIMIZERS[name]
        self.name = name
        self.names = [n for n, _ in named_params]
        dense = [p for _, p in named_params if id(p) not in sparse_ids]
        sparse = [p for _, p in named_params if id(p) in sparse_ids]
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        self._params = [p for _, p in named_params]
        self._fused_step = None
        #: The learning-rate schedule's factor on every group's lr at the next :meth:`step`
        #: (:mod:`ppl_models.infer.schedules`); 1: each group's own lr.
        self.lr_factor = 1.0
        if dense:
            dense_kwargs = dict(kwargs)
            if name in _FUSABLE and "fused" not in dense_kwargs and _fused_supported(dense):
                dense_kwargs["fused"] = True
            self.optimizers["dense"] = dense_cls(dense, lr=lr, **dense_kwargs)
            if dense_kwargs.get("fused") and dense_cls in (torch.optim.Adam, torch.optim.AdamW):
                self._fused_step = _FusedAdamStep(self.optimizers["dense"])
        if sparse:
            if sparse_cls is None:
                raise ValueError(
                    f"optimizer {name!r} cannot update sparse per-datapoint parameters; "
                    f"use one of {', '.join(n for n, (_, s) in _OPTIMIZERS.items() if s is not None)}"
                )
            sparse_kwargs = {k: v for k, v in kwargs.items() if k in ("betas", "eps")} if sparse_cls is torch.optim.SparseAdam else {}
            self.optimizers["sparse"] = sparse_cls(sparse, lr=lr, **sparse_kwargs)

    def zero_grad(self) -> None:
        """``zero_grad(set_to_none=True)`` of every optimizer, without its per-call bookkeeping."""
        for p in self._params:
            p.grad = None

    def step(self) -> None:
        """One step of every optimizer, each group at ``lr_factor`` times its own lr (the groups keep their lr)."""
        factor = self.lr_factor
        for key, opt in self.optimizers.items():
            groups = opt.param_groups
            if factor != 1.0:
                base = [group["lr"] for group in groups]
                for group, lr in zip(groups, base):
                    group["lr"] = lr * factor
            try:
                if not (key == "dense" and self._fused_step is not None and self._fused_step()):
                    opt.step()
            finally:
                if factor != 1.0:
                    for group, lr in zip(groups, base):
                        group["lr"] = lr

    def state_dict(self) -> dict:
        return {"names": list(self.names), **{k: opt.state_dict() for k, opt in self.optimizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("names", [])) != self.names:
            raise ValueError(
                "checkpoint's optimizer was built for other parameters: "
                f"expected {self.names}, received {list(state.get('names', []))}"
            )
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state[key])


def _fused_supported(params: List[torch.Tensor]) -> bool:
    return all(p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for p in params) and all(
        p.device.type in ("cpu", "cuda", "mps", "xpu") for p in params
    )


def make_optimizer(
    name: str, named_params: List[Tuple[str, torch.Tensor]], *, lr: float, sparse_ids: set = frozenset(), **kwargs
) -> Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZER_NAMES`) over ``named_params``."""
    return Optimizer(name, named_params, set(sparse_ids), lr, **kwargs)
