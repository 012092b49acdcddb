"""Declared structure of a latent-variable model.

Every model in :mod:`ppl_models` is a plain Pyro model function.  Beside it the
model states, as data, what the rest of the package needs to know without
reading its code:

* the **observed site** (its name, per-datapoint event shape and support),
* the **data plate** (the name of the ``pyro.plate`` over datapoints),
* its **local latent sites** (one per datapoint, inside the data plate) with
  their per-datapoint event shapes and supports.

Guides (:mod:`ppl_models.guides.mean_field`, :mod:`ppl_models.guides.amortized`), inference
strategies and the evaluator are built from a :class:`ModelSpec` alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Tuple

import pyro
import torch
from torch.distributions import constraints

__all__ = ["LatentSite", "ObservedSite", "ModelSpec", "ShapeError", "check_tensor", "data_plate"]


class ShapeError(ValueError):
    """A tensor handed to a model or guide does not have the declared shape,
    dtype, support or finiteness.  The message names the site, what was
    expected and what was received."""


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


@dataclass(frozen=True)
class LatentSite:
    """A local latent site: one draw per datapoint inside the data plate.

    :param name: the Pyro site name.
    :param event_shape: per-datapoint event shape, e.g. ``(z_dim,)``.
    :param support: the support of the prior (``constraints.real``,
        ``constraints.positive``, ``constraints.integer_interval(0, K - 1)``...).
    :param num_categories: for a discrete site, the number of values it takes.
    """

    name: str
    event_shape: Tuple[int, ...]
    support: constraints.Constraint = constraints.real
    num_categories: int | None = None

    @property
    def is_discrete(self) -> bool:
        return self.support.is_discrete

    @property
    def numel(self) -> int:
        return math.prod(self.event_shape)


@dataclass(frozen=True)
class ObservedSite:
    """The observed site: ``pyro.sample(name, ..., obs=x)`` inside the data plate.

    :param name: the Pyro site name.
    :param event_shape: per-datapoint event shape, e.g. ``(784,)``.
    :param support: support of the likelihood; inputs are checked against it.
    """

    name: str
    event_shape: Tuple[int, ...]
    support: constraints.Constraint = constraints.real

    def check(self, x: torch.Tensor) -> None:
        """Validate a batch ``x`` of shape ``(batch,) + event_shape``."""
        check_tensor(self.name, x, event_shape=self.event_shape, support=self.support)


@dataclass(frozen=True)
class ModelSpec:
    """What a model declares about itself (see the module docstring).

    :param name: registry name of the model.
    :param observed: the observed site.
    :param data_plate: name of the ``pyro.plate`` over datapoints.
    :param local_latents: local latent sites, in the order the model samples them.
    """

    name: str
    observed: ObservedSite
    data_plate: str = "data"
    local_latents: Tuple[LatentSite, ...] = field(default_factory=tuple)

    def latent(self, name: str) -> LatentSite:
        for site in self.local_latents:
            if site.name == name:
                return site
        valid = ", ".join(s.name for s in self.local_latents) or "(none)"
        raise KeyError(f"model {self.name!r} has no local latent site {name!r}; its local latents are: {valid}")


def check_tensor(
    site: str,
    value,
    *,
    event_shape: Tuple[int, ...] | None = None,
    support: constraints.Constraint | None = None,
    batch_dims: int = 1,
    dtype_kind: str = "float",
) -> None:
    """Raise one :class:`ShapeError` naming ``site`` if ``value`` is not a tensor
    of shape ``(batch,) * batch_dims + event_shape`` with finite values inside
    ``support``.

    :param dtype_kind: ``"float"`` (floating point) or ``"int"`` (integer indices).
    """
    if not isinstance(value, torch.Tensor):
        raise ShapeError(f"site {site!r}: expected a torch.Tensor, received {type(value).__name__}")
    if dtype_kind == "float" and not value.is_floating_point():
        raise ShapeError(f"site {site!r}: expected a floating-point tensor, received dtype {value.dtype}")
    if dtype_kind == "int" and (value.is_floating_point() or value.dtype == torch.bool or value.is_complex()):
        raise ShapeError(f"site {site!r}: expected an integer tensor, received dtype {value.dtype}")
    if event_shape is not None:
        expected_dim = batch_dims + len(event_shape)
        if value.dim() != expected_dim or tuple(value.shape[batch_dims:]) != tuple(event_shape):
            want = _fmt_shape(("batch",) * batch_dims + tuple(event_shape))
            raise ShapeError(f"site {site!r}: expected shape {want}, received {_fmt_shape(tuple(value.shape))}")
    if value.is_floating_point() and value.numel() > 0:
        # Fast path: one reduction; the exact offending entry is located only on failure.
        lo, hi = torch.aminmax(value.detach())
        lo, hi = lo.item(), hi.item()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = tuple((~torch.isfinite(value)).nonzero()[0].tolist())
            raise ShapeError(f"site {site!r}: expected finite values, received {value[bad].item()} at index {bad}")
        if support is constraints.unit_interval:
            if lo < 0.0 or hi > 1.0:
                bad = tuple(((value < 0) | (value > 1)).nonzero()[0].tolist())
                raise ShapeError(
                    f"site {site!r}: expected values in [0, 1], received {value[bad].item()} at index {bad}"
                )
            return
    if support is not None and support is not constraints.real and value.numel() > 0:
        ok = support.check(value)
        if not bool(ok.all()):
            bad = tuple((~ok).nonzero()[0].tolist())
            raise ShapeError(
                f"site {site!r}: expected values in the support {support}, received {value[bad].item()} at index {bad}"
            )


def data_plate(x: torch.Tensor, idx: torch.Tensor | None, num_data: int | None, name: str = "data", dim: int = -1):
    """The plate over datapoints shared by a model and its guides: the rows of ``x`` (its first dimension),
    at batch dimension ``dim`` (``-2`` when a plate over each datapoint's steps is ``-1``).

    With ``idx`` the batch is a subsample of a data set of size ``num_data``
    and the plate scales log-densities by ``num_data / batch``.
    """
    batch = x.shape[0]
    if idx is None:
        if num_data is not None and num_data != batch:
            raise ValueError(
                f"plate {name!r}: num_data={num_data} differs from the batch size {batch}, "
                "so the batch's indices idx are required"
            )
        return pyro.plate(name, batch, dim=dim)
    check_tensor("idx", idx, event_shape=(), dtype_kind="int")
    if idx.shape[0] != batch:
        raise ValueError(f"plate {name!r}: idx has {idx.shape[0]} entries but x has batch size {batch}")
    return pyro.plate(name, batch if num_data is None else num_data, subsample=idx, dim=dim)
