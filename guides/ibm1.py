r"""Guides for IBM Model 1 :mod:`ppl_models.ibm1` (model ``"ibm1"``).

``enumerate`` — the collapsed model: an empty guide that only opens the sentence plate.  The model marks every
alignment :math:`a_j` for parallel enumeration, so ``TraceEnum_ELBO(max_plate_nesting=2)`` sums them out and its
"ELBO" is the exact log-likelihood :math:`\sum_n \log p(f^{(n)} \mid e^{(n)})`.

``exact`` — :math:`q(a_j \mid e, f) = p(a_j \mid e, f) = t(f_j \mid e_{a_j}) / \sum_i t(f_j \mid e_i)`, the E-step of
EM as a guide.  No parameters of its own: it reads the model's :class:`~ppl_models.ibm1.IBM1Params` (its ``build``
returns the model's ``params``).  Every importance weight :math:`p(f, a \mid e) / q(a \mid e, f)` equals
:math:`p(f \mid e)`, so the ELBO, the IWAE bound and the log-likelihood coincide.  (Under ``TraceEnum_ELBO`` the
model's enumeration mark on ``a`` is ignored for a site the guide samples.)
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ppl_models.ibm1 import IBM1Params, log_joint
from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec, data_plate

__all__ = ["enumerate_guide", "build_enumerate", "exact_guide", "build_exact"]


def _check_model(guide: str, spec: ModelSpec) -> None:
    if spec.name != "ibm1":
        raise ValueError(f"guide {guide!r}: expected the model 'ibm1', received {spec.name!r}")


def enumerate_guide(src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor, tgt_lengths: torch.Tensor,
                    idx: torch.Tensor | None = None, *, num_data: int | None = None):
    """The empty guide of the collapsed model; same signature as :func:`ppl_models.ibm1.model` but for ``params``
    (the data are checked by the model)."""
    with data_plate(src, idx, num_data, name="sentences", dim=-2):
        pass


def build_enumerate(spec: ModelSpec, num_data: int | None = None) -> dict:
    """No network: the model always enumerates ``a``. Returns ``{}``."""
    _check_model("enumerate", spec)
    return {}


def exact_guide(src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor, tgt_lengths: torch.Tensor,
                idx: torch.Tensor | None = None, *, params: IBM1Params, num_data: int | None = None):
    r""":math:`q(a_j = i) = p(a_j = i \mid e, f)` for a padded batch (shapes as :func:`ppl_models.ibm1.model`);
    padded target positions draw NULL, as in the model."""
    pyro.module("params", params)
    logits = log_joint(params, src, src_lengths, tgt, tgt_lengths)  # (batch, T, S+1); Categorical normalizes
    with data_plate(src, idx, num_data, name="sentences", dim=-2), pyro.plate("positions", tgt.shape[1], dim=-1):
        pyro.sample("a", dist.Categorical(logits=logits))


def build_exact(spec: ModelSpec, num_data: int | None = None, *, model_modules: dict) -> dict:
    """The exact guide shares the model's ``params``."""
    _check_model("exact", spec)
    return {"params": model_modules["params"]}


register_guide("enumerate", model="ibm1", guide=enumerate_guide, build=build_enumerate)
register_guide("exact", model="ibm1", guide=exact_guide, build=build_exact)
