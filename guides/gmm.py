r"""Guides for the Gaussian mixture :mod:`ppl_models.gmm` (model ``"gmm"``).

``mean-field`` — SVI with :math:`\lambda_i` per datapoint (Hoffman et al. 2013):
:math:`q(z_i) = \mathrm{Categorical}(\mathrm{softmax}(\lambda_i))`, :math:`\lambda_i \in \mathbb{R}^K`, the generic
:mod:`ppl_models.guides.mean_field` guide applied to the declared discrete latent ``z`` (rows of a sparse
``nn.Embedding``, initially zero: :math:`q` starts uniform).  The Categorical has no reparameterized sample, so
``Trace_ELBO``/``TraceGraph_ELBO`` train :math:`\lambda` by **score-function** (REINFORCE) gradients,
:math:`\nabla_\lambda \mathrm{ELBO} = \mathbb{E}_q[(\log p(x, z) - \log q_\lambda(z)) \nabla_\lambda \log q_\lambda(z)]`
(``TraceGraph_ELBO`` keeps only the downstream cost of each datapoint — Rao-Blackwellization over the plate —
and can add baselines); the model's parameters still get pathwise gradients.  Expect a noisier, slower fit
than the collapsed form below.

``enumerate`` — the collapsed model: an empty guide (it only opens the data plate).  Its ``build`` switches the
model to enumerate ``z`` (``params.enumerate = True``), so with ``instantiate("gmm", "enumerate", num_data=N)``
``TraceEnum_ELBO`` sums ``z`` out exactly, so the "ELBO" is the exact
log-likelihood :math:`\sum_i \log \sum_k \pi_k \mathcal{N}(x_i; \mu_k, \Sigma_k)` and SVI is gradient ascent on
it.  (A model that does not enumerate would instead draw ``z`` from its prior, :math:`q = p(z)`, and Pyro warns
about a model site missing from the guide.)  The importance-sampled evaluator cannot use this guide: it needs
the guide to sample every latent.

``exact`` — :math:`q(z_i \mid x_i) = p(z_i \mid x_i)`, the exact responsibilities
:math:`r_{ik} = \pi_k \mathcal{N}(x_i; \mu_k, \Sigma_k) / \sum_j \pi_j \mathcal{N}(x_i; \mu_j, \Sigma_j)`.  It
has no parameters of its own: it reads the model's :class:`~ppl_models.gmm.GMMParams`, shared with the model
(its ``build`` returns the model's own ``params`` module, bound to the same keyword).  Every importance weight
:math:`p(x_i, z) / q(z \mid x_i)` then equals :math:`p(x_i)`: the ELBO, the IWAE bound and the log-likelihood
coincide — the E-step of EM seen as variational inference.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ppl_models.guides import mean_field
from ppl_models.gmm import GMMParams, log_joint
from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec, check_tensor, data_plate

__all__ = ["enumerate_guide", "build_enumerate", "exact_guide", "build_exact"]


def enumerate_guide(x: torch.Tensor, idx: torch.Tensor | None = None, *, num_data: int | None = None):
    r"""The empty guide of the collapsed model (``z`` is enumerated in the model); same signature as
    :func:`ppl_models.gmm.model` but for ``params``.

    :param x: observations, shape ``(batch, D)`` (used for the data plate's size).
    :param idx: indices of the batch in the data set, shape ``(batch,)``.
    :param num_data: size of the full data set.
    """
    check_tensor("x", x)  # a finite floating-point tensor; its shape is the model's to check
    with data_plate(x, idx, num_data):
        pass


def build_enumerate(spec: ModelSpec, num_data: int | None = None, *, model_modules: dict) -> dict:
    """The enumerate guide has no network; it switches the model to enumerate ``z``. Returns ``{}``."""
    if spec.name != "gmm":
        raise ValueError(f"guide 'enumerate': expected the model 'gmm', received {spec.name!r}")
    model_modules["params"].enumerate = True
    return {}


def exact_guide(x: torch.Tensor, idx: torch.Tensor | None = None, *, params: GMMParams, num_data: int | None = None):
    r""":math:`q(z \mid x) = p(z \mid x)` for a batch; same signature as :func:`ppl_models.gmm.model`.

    :param x: observations, shape ``(batch, D)``.
    :param idx: indices of the batch in the data set, shape ``(batch,)`` (only for the plate's scale).
    :param params: the model's :class:`~ppl_models.gmm.GMMParams` (the model's own module, registered under
        the same name ``"params"``).
    :param num_data: size of the full data set.
    """
    pyro.module("params", params)
    logits = log_joint(params, x)  # (batch, K); Categorical normalizes: q = the responsibilities
    with data_plate(x, idx, num_data):
        pyro.sample("z", dist.Categorical(logits=logits))


def build_exact(spec: ModelSpec, num_data: int | None = None, *, model_modules: dict) -> dict:
    """The exact guide has no network of its own: it shares the model's ``params``."""
    if spec.name != "gmm":
        raise ValueError(f"guide 'exact': expected the model 'gmm', received {spec.name!r}")
    return {"params": model_modules["params"]}


register_guide("mean-field", model="gmm", guide=mean_field.guide, build=mean_field.build)
register_guide("enumerate", model="gmm", guide=enumerate_guide, build=build_enumerate)
register_guide("exact", model="gmm", guide=exact_guide, build=build_exact)
