"""Optimizers chosen by name, with sparse per-datapoint parameters handled apart.

Parameters are split in two groups:

* dense parameters (networks, global ``pyro.param`` s) get the named torch optimizer
  (Adam uses the fused CPU/GPU kernel when torch supports it for the parameters);
* sparse parameters — the per-datapoint :math:`\\lambda_i` tables of
  :mod:`guides.mean_field`, ``nn.Embedding(sparse=True)`` weights — get the sparse
  counterpart (``SparseAdam`` for Adam), which reads and writes only the rows of the batch.

Per-step cost matters for small networks (the engine's hot path): :meth:`Optimizer.zero_grad` sets
the gradients to ``None`` directly.
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
        if dense:
            dense_kwargs = dict(kwargs)
            if name in _FUSABLE and "fused" not in dense_kwargs and _fused_supported(dense):
                dense_kwargs["fused"] = True
            self.optimizers["dense"] = dense_cls(dense, lr=lr, **dense_kwargs)
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
        for opt in self.optimizers.values():
            opt.step()

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
