r"""The lecture's Gaussian mixture model.

Generative story (``"gmm"``), for each datapoint :math:`i = 1, \dots, N`:

1. :math:`z_i \sim \mathrm{Categorical}(\pi)`, with :math:`\pi = (1/K, \dots, 1/K)` as in the lecture, or
   :math:`\pi = \mathrm{softmax}(\omega)` with learned logits :math:`\omega` (``learn_weights=True``)
2. :math:`x_i \mid z_i \sim \mathcal{N}(\mu_{z_i}, \Sigma_{z_i})`, with
   :math:`\Sigma_k = \mathrm{diag}(\sigma_k^2)` (``covariance="diag"``, a scale vector
   :math:`\sigma_k = \exp(\log\sigma_k)` per component) or :math:`\Sigma_k = L_k L_k^\top` (``covariance="full"``,
   a lower Cholesky factor per component, parameterized through ``LowerCholeskyTransform``: strictly lower
   entries free, diagonal :math:`\exp` of free numbers: onto ``constraints.lower_cholesky``).

The parameters :math:`\mu, \sigma \text{ or } L, \omega` live in one :class:`GMMParams` module, passed as the
keyword ``params`` to the model and to its guides and registered with ``pyro.module("params", ...)``.

Everything about one datapoint is exactly computable, which the inference strategies use:

* :func:`log_likelihood`: :math:`\log p(x_i) = \log \sum_k \pi_k \mathcal{N}(x_i; \mu_k, \Sigma_k)`;
* :func:`posterior`: the responsibilities :math:`r_{ik} = p(z_i = k \mid x_i) = \pi_k \mathcal{N}(x_i; \mu_k,
  \Sigma_k) / p(x_i)`;
* EM (:func:`ppl_models.infer.em.fit_em`) through :meth:`GMMParams.e_step` / :meth:`GMMParams.m_step`.

**Enumeration.**  The site ``z`` is marked ``infer={"enumerate": "parallel"}`` only when
``params.enumerate`` is true (``build(enumerate=True)``, or set the attribute).  Then ``TraceEnum_ELBO`` with
the empty ``"enumerate"`` guide sums ``z`` out exactly (the collapsed model :math:`p(x_i)`, the ELBO equals the
log-likelihood).  Otherwise ``z`` is an ordinary sampled site, drawn by a guide (``"mean-field"``, ``"exact"``;
see :mod:`ppl_models.guides.gmm`) under ``Trace_ELBO``/``TraceGraph_ELBO``.

The Bayesian variant, with priors on :math:`\pi, \mu, \sigma`, is its own model: :mod:`ppl_models.bayesian_gmm`.

References:
    Bishop (2006), Pattern Recognition and Machine Learning, §9.2 (mixtures of Gaussians, EM).
    Murphy (2012), Machine Learning: a Probabilistic Perspective, §11.2-11.4.
    Arthur & Vassilvitskii (2007), k-means++: the Advantages of Careful Seeding.
    Pyro tutorial "Gaussian Mixture Model" (``examples/gmm``); Pyro "Inference with Discrete Latent Variables".
"""

from __future__ import annotations

import math
from typing import Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torch.distributions.transforms import LowerCholeskyTransform

from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite, ShapeError, check_tensor, data_plate

__all__ = [
    "COVARIANCE_KINDS",
    "INIT_METHODS",
    "GMMParams",
    "check_positive_int",
    "make_spec",
    "model",
    "log_joint",
    "log_likelihood",
    "posterior",
    "simulate",
    "build",
]

#: Valid values of ``covariance``.
COVARIANCE_KINDS = ("diag", "full")
#: Valid values of ``method`` in :meth:`GMMParams.init_from_data`.
INIT_METHODS = ("kmeans++", "random")

_LOWER_CHOLESKY = LowerCholeskyTransform()  # unconstrained (D, D) -> constraints.lower_cholesky


def check_positive_int(what: str, name: str, value) -> None:
    """Raise a ``ValueError`` naming ``what`` and ``name`` unless ``value`` is an ``int`` >= 1 (not a ``bool``)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what}: {name} must be a positive integer (at least 1), received {value!r}")


def _check_covariance_kind(what: str, covariance) -> None:
    if covariance not in COVARIANCE_KINDS:
        raise ValueError(f"{what}: covariance must be one of {', '.join(COVARIANCE_KINDS)}, received {covariance!r}")


class GMMParams(nn.Module):
    r"""The mixture's parameters: locations :math:`\mu` ``(K, D)``, covariances and weight logits ``(K,)``.

    Stored unconstrained: ``log_scales`` ``(K, D)`` for ``covariance="diag"``; ``scale_tril_raw`` ``(K, D, D)``
    for ``covariance="full"``, mapped to the Cholesky factors by ``LowerCholeskyTransform``.  The weight
    logits are a parameter with ``learn_weights=True`` and a buffer (fixed, uniform unless set with
    :meth:`set_weights`) otherwise.  Values are set, with checks, by :meth:`set_locs`, :meth:`set_scales`,
    :meth:`set_scale_tril`, :meth:`set_covariance`, :meth:`set_weights` and :meth:`init_from_data`.

    It implements :class:`ppl_models.infer.em.EMModel` (:meth:`e_step`, :meth:`m_step`, :meth:`log_likelihood`).

    :param num_components: :math:`K \ge 1`.
    :param data_dim: :math:`D \ge 1`.
    :param covariance: ``"diag"`` or ``"full"``.
    :param learn_weights: learn :math:`\pi = \mathrm{softmax}(\omega)` (else :math:`\pi` stays fixed, uniform).
    :param enumerate: mark ``z`` for parallel enumeration in :func:`model` (for ``TraceEnum_ELBO``).
    :param init_scale: initial scales :math:`\sigma_{kd}` (a number or a tensor broadcastable to ``(K, D)``);
        for ``"full"`` the initial Cholesky factors are ``diag(init_scale)``.
    :param init_covariance: ``"full"`` only: initial covariances, shape ``(K, D, D)`` or ``(D, D)``
        (overrides ``init_scale``).
    :param loc_scale: the initial locations are drawn from :math:`\mathcal{N}(0, loc\_scale^2)`
        (use :meth:`init_from_data` to start them at datapoints).
    :param reg_covar: the jitter the M-step adds to every variance (as scikit-learn's ``reg_covar``), which
        keeps a covariance estimated from few points positive definite.
    :param generator: random generator of the initial locations (``None``: torch's global one).
    """

    def __init__(
        self,
        num_components: int = 3,
        data_dim: int = 2,
        *,
        covariance: str = "diag",
        learn_weights: bool = False,
        enumerate: bool = False,
        init_scale=1.0,
        init_covariance: torch.Tensor | None = None,
        loc_scale: float = 1.0,
        reg_covar: float = 1e-6,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        check_positive_int("GMMParams", "num_components", num_components)
        check_positive_int("GMMParams", "data_dim", data_dim)
        _check_covariance_kind("GMMParams", covariance)
        if not (isinstance(reg_covar, (int, float)) and reg_covar >= 0 and math.isfinite(reg_covar)):
            raise ValueError(f"GMMParams: reg_covar must be a finite number >= 0, received {reg_covar!r}")
        if init_covariance is not None and covariance != "full":
            raise ValueError(
                f"GMMParams: init_covariance applies to covariance='full' only, received covariance={covariance!r} "
                "(use init_scale for 'diag')"
            )
        K, D = num_components, data_dim
        self.num_components, self.data_dim = K, D
        self.covariance, self.learn_weights = covariance, bool(learn_weights)
        self.enumerate = bool(enumerate)
        self.reg_covar = float(reg_covar)
        self.locs = nn.Parameter(torch.randn(K, D, generator=generator) * loc_scale)
        if covariance == "diag":
            self.log_scales = nn.Parameter(torch.zeros(K, D))
        else:
            self.scale_tril_raw = nn.Parameter(torch.zeros(K, D, D))
        if self.learn_weights:
            self.weight_logits = nn.Parameter(torch.zeros(K))
        else:
            self.register_buffer("weight_logits", torch.zeros(K))
        if init_covariance is not None:
            self.set_covariance(init_covariance)
        else:
            scales = torch.as_tensor(init_scale, dtype=self.locs.dtype)
            if covariance == "diag":
                self.set_scales(scales)
            else:
                self.set_scale_tril(torch.diag_embed(self._broadcast("init_scale", scales, (K, D))))

    # ------------------------------------------------------------------ values
    @property
    def scales(self) -> torch.Tensor:
        r"""Marginal standard deviations :math:`\sqrt{\Sigma_{k,dd}}`, shape ``(K, D)`` (the scales for ``"diag"``)."""
        if self.covariance == "diag":
            return self.log_scales.exp()
        return self.scale_tril.pow(2).sum(-1).sqrt()

    @property
    def scale_tril(self) -> torch.Tensor:
        """Lower Cholesky factors :math:`L_k` of the covariances, shape ``(K, D, D)``."""
        if self.covariance == "diag":
            return torch.diag_embed(self.log_scales.exp())
        return _LOWER_CHOLESKY(self.scale_tril_raw)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        r""":math:`\Sigma_k`, shape ``(K, D, D)``."""
        tril = self.scale_tril
        return tril @ tril.mT

    @property
    def weights(self) -> torch.Tensor:
        r""":math:`\pi`, shape ``(K,)``."""
        return self.weight_logits.softmax(-1)

    @property
    def log_weights(self) -> torch.Tensor:
        r""":math:`\log \pi`, shape ``(K,)``."""
        return self.weight_logits.log_softmax(-1)

    def component_distribution(self, z: torch.Tensor | None = None) -> dist.TorchDistribution:
        r""":math:`\mathcal{N}(\mu_{z}, \Sigma_{z})` with batch shape ``z.shape`` and event shape ``(D,)``;
        ``z=None``: all components, batch shape ``(K,)``."""
        locs = self.locs if z is None else self.locs[z]
        if self.covariance == "diag":
            scales = self.log_scales.exp()
            return dist.Normal(locs, scales if z is None else scales[z]).to_event(1)
        tril = self.scale_tril
        return dist.MultivariateNormal(locs, scale_tril=tril if z is None else tril[z])

    # ------------------------------------------------------------------ setters (checked)
    def _broadcast(self, name: str, value, shape) -> torch.Tensor:
        value = torch.as_tensor(value, dtype=self.locs.dtype, device=self.locs.device)
        try:
            return torch.broadcast_to(value, shape)
        except RuntimeError:
            raise ShapeError(
                f"GMMParams: {name}: expected a shape broadcastable to {tuple(shape)}, received {tuple(value.shape)}"
            ) from None

    @torch.no_grad()
    def set_locs(self, locs) -> "GMMParams":
        r"""Set :math:`\mu` (shape ``(K, D)``, or broadcastable to it)."""
        locs = self._broadcast("locs", locs, (self.num_components, self.data_dim))
        check_tensor("locs", locs, event_shape=(self.data_dim,))
        self.locs.copy_(locs)
        return self

    @torch.no_grad()
    def set_scales(self, scales) -> "GMMParams":
        r"""``"diag"`` only: set :math:`\sigma` (shape ``(K, D)``, or broadcastable to it).

        :raises ValueError: naming the component, if a scale is zero, negative or not finite (a singular or
            undefined covariance).
        """
        if self.covariance != "diag":
            raise ValueError(
                "GMMParams.set_scales: expected covariance='diag', received a GMM with covariance='full' "
                "(use set_covariance or set_scale_tril)"
            )
        scales = self._broadcast("scales", scales, (self.num_components, self.data_dim))
        bad = ~(torch.isfinite(scales) & (scales > 0))
        if bool(bad.any()):
            k, d = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"GMMParams: component {k}: expected positive finite scales (a non-singular covariance), "
                f"received scale {scales[k, d].item()} in dimension {d}"
            )
        self.log_scales.copy_(scales.log())
        return self

    @torch.no_grad()
    def set_scale_tril(self, scale_tril) -> "GMMParams":
        r"""``"full"`` only: set the Cholesky factors :math:`L_k` (shape ``(K, D, D)`` or ``(D, D)``): lower
        triangular with a positive diagonal.

        :raises ValueError: naming the component whose factor is not lower triangular or has a diagonal entry
            that is not positive (a singular covariance).
        """
        if self.covariance != "full":
            raise ValueError(
                "GMMParams.set_scale_tril: expected covariance='full', received a GMM with covariance='diag' "
                "(use set_scales)"
            )
        K, D = self.num_components, self.data_dim
        tril = self._broadcast("scale_tril", scale_tril, (K, D, D))
        for k in range(K):
            diag = tril[k].diagonal()
            if not bool(torch.isfinite(tril[k]).all()):
                raise ValueError(
                    f"GMMParams: component {k}: expected a finite Cholesky factor, received {tril[k].tolist()}"
                )
            if not bool(torch.equal(tril[k], tril[k].tril())):
                raise ValueError(
                    f"GMMParams: component {k}: expected a lower-triangular Cholesky factor, "
                    f"received {tril[k].tolist()}"
                )
            if not bool((diag > 0).all()):
                raise ValueError(
                    f"GMMParams: component {k}: expected a Cholesky factor with a positive diagonal (a non-singular "
                    f"covariance), received diagonal {diag.tolist()}"
                )
        self.scale_tril_raw.copy_(_LOWER_CHOLESKY.inv(tril))
        return self

    @torch.no_grad()
    def set_covariance(self, covariance) -> "GMMParams":
        r"""Set :math:`\Sigma_k` (shape ``(K, D, D)`` or ``(D, D)``): ``"full"`` stores their Cholesky factors;
        ``"diag"`` accepts diagonal matrices only and stores the square roots of their diagonals.

        :raises ValueError: naming the component whose matrix is not symmetric positive definite.
        """
        K, D = self.num_components, self.data_dim
        cov = self._broadcast("covariance", covariance, (K, D, D))
        for k in range(K):
            c = cov[k]
            if not bool(torch.isfinite(c).all()):
                raise ValueError(f"GMMParams: component {k}: expected a finite covariance, received {c.tolist()}")
            if not torch.allclose(c, c.mT, rtol=1e-5, atol=1e-8 * float(c.abs().max())):
                raise ValueError(f"GMMParams: component {k}: expected a symmetric covariance, received {c.tolist()}")
        if self.covariance == "diag":
            off = cov - torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1))
            if bool((off != 0).any()):
                k = int((off != 0).flatten(1).any(1).nonzero()[0])
                raise ValueError(
                    f"GMMParams: component {k}: covariance='diag' expects a diagonal covariance, received "
                    f"{cov[k].tolist()}"
                )
            variances = cov.diagonal(dim1=-2, dim2=-1)
            bad = ~(variances > 0)
            if bool(bad.any()):
                k = int(bad.any(-1).nonzero()[0])
                raise ValueError(
                    f"GMMParams: component {k}: expected a positive-definite covariance, received variances "
                    f"{variances[k].tolist()}"
                )
            return self.set_scales(variances.sqrt())
        tril, info = torch.linalg.cholesky_ex(cov)
        if bool((info != 0).any()):
            k = int((info != 0).nonzero()[0])
            smallest = torch.linalg.eigvalsh(cov[k]).min().item()
            raise ValueError(
                f"GMMParams: component {k}: expected a positive-definite covariance, received a matrix with "
                f"smallest eigenvalue {smallest:.6g}"
            )
        self.scale_tril_raw.copy_(_LOWER_CHOLESKY.inv(tril))
        return self

    @torch.no_grad()
    def set_weights(self, weights) -> "GMMParams":
        r"""Set :math:`\pi` (shape ``(K,)``: positive, summing to 1).  Allowed with ``learn_weights=False``
        too: the weights then stay fixed at these values."""
        weights = self._broadcast("weights", weights, (self.num_components,))
        if not (bool((weights > 0).all()) and abs(float(weights.sum()) - 1.0) < 1e-6):
            raise ValueError(f"GMMParams: weights: expected positive numbers summing to 1, received {weights.tolist()}")
        self.weight_logits.copy_(weights.log())
        return self

    @torch.no_grad()
    def init_from_data(
        self, x: torch.Tensor, generator: torch.Generator | None = None, method: str = "kmeans++"
    ) -> "GMMParams":
        r"""Start the locations at ``K`` distinct datapoints of ``x`` and the covariances at the data's.

        * ``method="kmeans++"``: the k-means++ seeding (Arthur & Vassilvitskii 2007): the first location is a
          uniformly drawn datapoint, each next one a datapoint drawn with probability proportional to its
          squared distance to the nearest location already chosen;
        * ``method="random"``: ``K`` distinct rows drawn uniformly.

        Every component's covariance becomes the pooled within-cluster covariance of the data around the
        chosen locations (each datapoint's residual from its nearest location, divided by :math:`N - K`) plus
        ``reg_covar`` — its diagonal for ``"diag"``; learned weights become uniform.

        :param x: data, shape ``(N, D)`` with :math:`N \ge K`.
        :param generator: the only source of randomness (``None``: torch's global generator).
        :raises ValueError: if ``K > N``, or that covariance is singular (e.g. a constant dimension with
            ``reg_covar=0``), naming the component.
        """
        if method not in INIT_METHODS:
            raise ValueError(
                f"GMMParams.init_from_data: method must be one of {', '.join(INIT_METHODS)}, received {method!r}"
            )
        _check_x(self, x)
        N, K = x.shape[0], self.num_components
        if K > N:
            raise ValueError(
                f"GMMParams.init_from_data: expected at least num_components={K} datapoints (one distinct datapoint "
                f"per component), received {N}"
            )
        if method == "random":
            chosen = torch.randperm(N, generator=generator)[:K]
        else:
            chosen = torch.empty(K, dtype=torch.long)
            chosen[0] = torch.randint(N, (), generator=generator)
            d2 = (x - x[chosen[0]]).pow(2).sum(-1)
            taken = torch.zeros(N, dtype=torch.bool)
            taken[chosen[0]] = True
            for k in range(1, K):
                w = d2.masked_fill(taken, 0.0)
                if not bool(w.sum() > 0):  # every remaining point coincides with a chosen one
                    w = (~taken).to(x.dtype)
                chosen[k] = torch.multinomial(w, 1, generator=generator)[0]
                taken[chosen[k]] = True
                d2 = torch.minimum(d2, (x - x[chosen[k]]).pow(2).sum(-1))
        locs = x[chosen]
        self.set_locs(locs)
        # Pooled within-cluster spread: every datapoint's residual from its nearest location.
        nearest = torch.cdist(x, locs).argmin(-1)
        residual = x - locs[nearest]
        pooled = residual.T @ residual / max(N - K, 1)
        if self.covariance == "diag":
            self.set_scales((pooled.diagonal() + self.reg_covar).sqrt().expand(K, -1))
        else:
            self.set_covariance(pooled + self.reg_covar * torch.eye(self.data_dim, dtype=x.dtype))
        if self.learn_weights:
            self.weight_logits.zero_()
        return self

    # ------------------------------------------------------------------ EM (ppl_models.infer.em.EMModel)
    @torch.no_grad()
    def e_step(self, x: torch.Tensor) -> torch.Tensor:
        r"""Responsibilities :math:`r_{ik} = p(z_i = k \mid x_i)`, shape ``(N, K)`` (the E-step's statistics)."""
        return posterior(self, x)

    @torch.no_grad()
    def m_step(self, x: torch.Tensor, stats: torch.Tensor) -> None:
        r"""Closed-form maximizer of :math:`\sum_i \sum_k r_{ik} \log[\pi_k \mathcal{N}(x_i; \mu_k, \Sigma_k)]`:

        * :math:`N_k = \sum_i r_{ik}` (plus :math:`10\,\epsilon_{\mathrm{machine}}`, as scikit-learn, so an empty
          component divides by no zero);
        * :math:`\mu_k = \sum_i r_{ik} x_i / N_k`;
        * ``"diag"``: :math:`\sigma_{kd}^2 = \sum_i r_{ik} (x_{id} - \mu_{kd})^2 / N_k + reg\_covar`;
          ``"full"``: :math:`\Sigma_k = \sum_i r_{ik} (x_i - \mu_k)(x_i - \mu_k)^\top / N_k + reg\_covar\, I`;
        * learned weights: :math:`\pi_k = N_k / N`; fixed weights are left as they are.

        :param x: data, shape ``(N, D)``.
        :param stats: the responsibilities from :meth:`e_step`, shape ``(N, K)``.
        """
        _check_x(self, x)
        K = self.num_components
        check_tensor("responsibilities", stats, event_shape=(K,))
        if stats.shape[0] != x.shape[0]:
            raise ShapeError(
                f"GMMParams.m_step: expected responsibilities for the {x.shape[0]} rows of x, received {stats.shape[0]}"
            )
        resp = stats.to(x.dtype)
        nk = resp.sum(0) + 10 * torch.finfo(x.dtype).eps  # (K,)
        locs = resp.T @ x / nk[:, None]  # (K, D)
        diff = x[:, None, :] - locs  # (N, K, D)
        if self.covariance == "diag":
            var = torch.einsum("nk,nkd->kd", resp, diff * diff) / nk[:, None] + self.reg_covar
            self.set_locs(locs)
            self.set_scales(var.sqrt())
        else:
            cov = torch.einsum("nk,nkd,nke->kde", resp, diff, diff) / nk[:, None, None]
            cov = 0.5 * (cov + cov.mT) + self.reg_covar * torch.eye(self.data_dim, dtype=x.dtype)
            self.set_locs(locs)
            self.set_covariance(cov)
        if self.learn_weights:
            self.weight_logits.copy_((nk / nk.sum()).log())

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(x_i)` of every row, shape ``(N,)`` (see the module function :func:`log_likelihood`)."""
        return log_likelihood(self, x)

    def extra_repr(self) -> str:
        return (
            f"num_components={self.num_components}, data_dim={self.data_dim}, covariance={self.covariance!r}, "
            f"learn_weights={self.learn_weights}, enumerate={self.enumerate}"
        )


def _check_x(params, x: torch.Tensor) -> None:
    check_tensor("x", x, event_shape=(params.data_dim,))
    dtype = params.locs.dtype
    if x.dtype != dtype:
        raise ShapeError(f"site 'x': expected dtype {dtype} (the dtype of the GMM's parameters), received {x.dtype}")


def make_spec(num_components: int = 3, data_dim: int = 2, name: str = "gmm") -> ModelSpec:
    return ModelSpec(
        name=name,
        observed=ObservedSite("x", (data_dim,), constraints.real),
        data_plate="data",
        local_latents=(
            LatentSite(
                "z", (), support=constraints.integer_interval(0, num_components - 1), num_categories=num_components
            ),
        ),
    )


def model(x: torch.Tensor, idx: torch.Tensor | None = None, *, params: GMMParams, num_data: int | None = None):
    """The generative story above (``z`` enumerated only when ``params.enumerate``).

    :param x: observations, shape ``(batch, D)``, in the parameters' dtype.
    :param idx: indices of the batch in the full data set, shape ``(batch,)``; ``None`` when ``x`` is the
        whole data set.
    :param params: the :class:`GMMParams` (registered as ``"params"``).
    :param num_data: size :math:`N` of the full data set (for the ELBO's N/batch scale).
    """
    _check_x(params, x)
    pyro.module("params", params)
    infer = {"enumerate": "parallel"} if params.enumerate else {}
    with data_plate(x, idx, num_data):
        z = pyro.sample("z", dist.Categorical(logits=params.log_weights), infer=infer)
        pyro.sample("x", params.component_distribution(z), obs=x)


# ---------------------------------------------------------------------------------------------------------
# Exact quantities
# ---------------------------------------------------------------------------------------------------------


def log_joint(params: GMMParams, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \pi_k + \log \mathcal{N}(x_i; \mu_k, \Sigma_k)`, shape ``(batch, K)``."""
    _check_x(params, x)
    return params.log_weights + params.component_distribution().log_prob(x[:, None, :])


def log_likelihood(params: GMMParams, x: torch.Tensor) -> torch.Tensor:
    r"""Exact :math:`\log p(x_i) = \log \sum_k \pi_k \mathcal{N}(x_i; \mu_k, \Sigma_k)` of every row.

    :param params: the model's parameters.
    :param x: observations, shape ``(batch, D)``.
    :return: shape ``(batch,)`` (differentiable in the parameters).
    """
    return torch.logsumexp(log_joint(params, x), -1)


def posterior(params: GMMParams, x: torch.Tensor) -> torch.Tensor:
    r"""Exact responsibilities :math:`p(z_i = k \mid x_i)`, shape ``(batch, K)`` (rows sum to 1)."""
    return log_joint(params, x).softmax(-1)


def simulate(
    params: GMMParams, num_data: int, generator: torch.Generator | None = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw a data set from the model itself (steps 1 and 2 above), without Pyro.

    :param params: the model's parameters.
    :param num_data: number of datapoints :math:`N`.
    :param generator: the only source of randomness (``None``: torch's global generator).
    :return: ``x`` of shape ``(num_data, D)`` in the parameters' dtype and the components ``z`` of shape
        ``(num_data,)`` (``torch.long``).
    """
    check_positive_int("simulate", "num_data", num_data)
    with torch.no_grad():
        z = torch.multinomial(params.weights, num_data, replacement=True, generator=generator)
        eps = torch.randn(num_data, params.data_dim, generator=generator, dtype=params.locs.dtype)
        x = params.locs[z] + (params.scale_tril[z] @ eps[:, :, None]).squeeze(-1)
    return x, z


def build(
    num_components: int = 3,
    data_dim: int = 2,
    covariance: str = "diag",
    learn_weights: bool = False,
    enumerate: bool = False,
    init_scale: float = 1.0,
    loc_scale: float = 1.0,
    reg_covar: float = 1e-6,
    seed: int | None = None,
) -> ModelParts:
    """The declared structure and the parameters (``params``: a :class:`GMMParams`).

    :param enumerate: mark ``z`` for enumeration (use with the ``"enumerate"`` guide and ``TraceEnum_ELBO``).
    :param seed: seeds the random initial locations (``None``: torch's global generator); start them at the
        data with ``params.init_from_data(x)``.
    """
    check_positive_int("model 'gmm'", "num_components", num_components)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    params = GMMParams(
        num_components,
        data_dim,
        covariance=covariance,
        learn_weights=learn_weights,
        enumerate=enumerate,
        init_scale=init_scale,
        loc_scale=loc_scale,
        reg_covar=reg_covar,
        generator=generator,
    )
    return ModelParts(spec=make_spec(num_components, data_dim), modules={"params": params})


register_model("gmm", model=model, build=build)
