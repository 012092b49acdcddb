r"""Compare gradient estimators of the ELBO: variance and SNR at fixed parameters, training curves over seeds,
ArviZ diagnostics (R-hat/ESS across seeds, PSIS k̂, LOO), and a NUTS reference for the small models.

The lecture's point: the score-function (REINFORCE) and the reparameterized estimators are both unbiased, but
their variances differ by orders of magnitude.  This module measures it; ``ppl-models compare CONFIG.toml`` and
``examples/compare_estimators.py`` run it from a TOML file (schema below).

**Problems** (``[compare] problems``), each a model + guide + data:

* ``vae`` — the MNIST VAE (:mod:`ppl_models.vae`) with its amortized encoder, on binarized MNIST
  (``[vae] data = "mnist"``) or on data simulated from a random decoder (``"simulated"``);
* ``gmm`` — the Gaussian mixture (:mod:`ppl_models.gmm`) with the per-datapoint Categorical guide: ``z`` is
  discrete, so only score-function estimators apply (the others are listed with the reason);
* ``linear-gaussian`` — the conjugate model (:mod:`ppl_models.linear_gaussian`) with the per-datapoint Gaussian
  guide: the exact ELBO gradient is known in closed form;
* ``bayesian-gmm`` — the Bayesian mixture with ``z`` summed out and a mean-field guide over the global latents
  (:func:`bayesian_gmm_guide`): VI over seeds beside a NUTS reference, and LOO across ``K``.

**Gradient statistics** (:func:`gradient_statistics`): at fixed parameters (after ``pretrain_steps`` Adam steps),
``num_draws`` independent one-draw gradients of the loss :math:`-\mathrm{ELBO}` on one fixed batch; per parameter
element the mean, the variance and the signal-to-noise ratio :math:`|\mathrm{mean}| / \mathrm{sd}`; the cost per
gradient; where the exact gradient is computable (discrete guides: by enumerating every guide site; the
linear-Gaussian model: in closed form, :func:`linear_gaussian_exact_elbo`) the z-scores of the mean against it.
Baseline estimators are warmed up for ``warmup`` draws first (the model's and guide's parameters stay fixed; the
baselines keep adapting, as in training).

**Training** (:func:`train_estimator`): every estimator on the same model, data, initialisation per seed and
number of steps, through :class:`~ppl_models.infer.engine.Trainer`; every ``eval_every`` steps the same
objective is measured for all of them — the ELBO per datapoint on a fixed set with ``eval_particles`` draws
(exact by enumeration for discrete guides) — so IWAE's curve is comparable.

**ArviZ** (via :mod:`ppl_models.infer.diagnostics`): one InferenceData per problem and estimator with the seeds as
chains — ``posterior`` (draws of the global latents from each seed's guide, Bayesian GMM), ``sample_stats``
(``elbo``: the training curve), ``log_likelihood`` (pointwise, from importance sampling) — written to netCDF;
``az.summary`` with R-hat and ESS across seeds; per-datapoint PSIS k̂ of the final q (Yao et al. 2018:
< 0.5 good, > 0.7 unreliable).

**How the pointwise log-likelihood of a VI fit is obtained.**  Local latents (VAE, GMM, linear-Gaussian): the
IWAE estimate :math:`\log \frac1S \sum_s p(x_i, z_s)/q(z_s \mid x_i)` with :math:`S` = ``num_samples`` draws of
the final guide (:func:`ppl_models.infer.evaluate.log_weights`), its k̂ per datapoint.  Global latents (Bayesian
GMM): importance sampling over the global latents' guide — draws :math:`\theta_s \sim q(\theta)`, weights
:math:`p(x, \theta_s)/q(\theta_s)` Pareto-smoothed (their k̂ is Yao et al.'s diagnostic of the whole fit),
then resampled in proportion to the smoothed weights (sampling-importance-resampling) to give approximate
posterior draws whose :math:`\log p(x_i \mid \theta_s) = \log \sum_k \pi_k \mathcal{N}(x_i; \mu_k, \sigma_k)` is
the pointwise log-likelihood handed to ``az.loo``/``az.compare``.

Mixture components are exchangeable; draws are put in a canonical order (by the first coordinate of the
locations) before any summary, so R-hat measures disagreement between seeds, not label switching.

References:
    Roeder, Wu & Duvenaud (2017), Sticking the Landing.
    Yao, Vehtari, Simpson & Gelman (2018), Yes, but Did It Work?: Evaluating Variational Inference.
    Vehtari, Gelman & Gabry (2017), Practical Bayesian model evaluation using leave-one-out cross-validation.
    Mohamed, Rosca, Figurnov & Mnih (2020), Monte Carlo Gradient Estimation in Machine Learning.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn
from torch.nn import functional as F

from ppl_models import registry
from ppl_models.infer import diagnostics
from ppl_models.atomic import atomic_write_bytes
from ppl_models.app.config import ConfigError, parse_sections, read_toml
from ppl_models.data import TensorDataset
from ppl_models.infer.estimators import ESTIMATOR_NAMES, Estimator, EstimatorError, make_estimator
from ppl_models.registry import UnknownNameError

__all__ = [
    "PROBLEMS",
    "BUILTIN_PROBLEMS",
    "CompareConfig",
    "load_compare_config",
    "Problem",
    "build_problem",
    "GradientStats",
    "gradient_statistics",
    "train_estimator",
    "linear_gaussian_exact_elbo",
    "enumerated_exact_elbo",
    "bayesian_gmm_guide",
    "BayesianGMMGuideParams",
    "run_comparison",
]

#: The built-in problems; ``"experiment"`` compares the model, guide and data of any ``ppl-models fit`` config
#: (``[experiment] config``), e.g. a model declared with :mod:`ppl_models.declarative`.
BUILTIN_PROBLEMS = ("vae", "gmm", "linear-gaussian", "bayesian-gmm")
PROBLEMS = BUILTIN_PROBLEMS + ("experiment",)


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CompareSection:
    problems: List[str] = field(default_factory=lambda: list(BUILTIN_PROBLEMS))
    estimators: List[str] = field(default_factory=lambda: list(ESTIMATOR_NAMES))
    seed: int = 0
    run_dir: str = "runs/compare"
    plots: bool = True
    progress: bool = True
    threads: int = 1  # torch threads (the comparison's timings are per thread)


@dataclass
class GradientsSection:
    num_draws: int = 1000  # one-draw gradients per estimator
    batch_size: int = 64  # datapoints of the fixed batch
    iwae_particles: int = 5  # K of the iwae estimator
    warmup: int = 200  # baseline warm-up draws
    pretrain_steps: int = 200  # Adam steps before measuring (0: at initialisation)
    pretrain_lr: float = 1e-3


@dataclass
class TrainingSection:
    num_seeds: int = 4  # 0: the gradient statistics only (no training, ArviZ or NUTS part)
    num_steps: int = 500
    batch_size: int = 100
    lr: float = 1e-3
    eval_every: int = 50
    eval_particles: int = 16
    eval_size: int = 500  # datapoints of the fixed evaluation set
    num_samples: int = 500  # importance samples for the pointwise log-likelihood and k̂ of the final q


@dataclass
class VAESection:
    data: str = "mnist"  # "mnist" (binarized MNIST, needs the data files) or "simulated"
    num_data: int = 2000
    z_dim: int = 10
    hidden_dims: List[int] = field(default_factory=lambda: [200])
    x_dim: int = 784  # simulated data only


@dataclass
class GMMSection:
    num_data: int = 200
    num_components: int = 3
    data_dim: int = 2
    separation: float = 4.0  # distance scale of the true locations


@dataclass
class LinearGaussianSection:
    num_data: int = 200
    z_dim: int = 2
    x_dim: int = 5
    nuts_datapoints: int = 10  # NUTS reference over the latents of the first datapoints
    nuts_warmup: int = 200
    nuts_samples: int = 300
    nuts_max_tree_depth: int = 10


@dataclass
class BayesianGMMSection:
    num_data: int = 100
    true_components: int = 3
    num_components: int = 3  # K of the estimator comparison
    compare_components: List[int] = field(default_factory=lambda: [2, 3, 4, 5])  # K of az.compare
    data_dim: int = 2
    separation: float = 4.0
    num_draws: int = 500  # draws from each seed's q
    nuts_warmup: int = 200
    nuts_samples: int = 300
    nuts_max_tree_depth: int = 10
    lr: float = 0.02  # Adam step size of the guide of the global latents


@dataclass
class ExperimentSection:
    config: str = ""  # a `ppl-models fit` TOML whose model, guide and data the "experiment" problem compares


_COMPARE_SECTIONS = {
    "compare": CompareSection,
    "gradients": GradientsSection,
    "training": TrainingSection,
    "vae": VAESection,
    "gmm": GMMSection,
    "linear_gaussian": LinearGaussianSection,
    "bayesian_gmm": BayesianGMMSection,
    "experiment": ExperimentSection,
}


@dataclass
class CompareConfig:
    """The comparison's configuration (``ppl-models compare CONFIG.toml``); sections as the dataclasses above."""

    compare: CompareSection = field(default_factory=CompareSection)
    gradients: GradientsSection = field(default_factory=GradientsSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    vae: VAESection = field(default_factory=VAESection)
    gmm: GMMSection = field(default_factory=GMMSection)
    linear_gaussian: LinearGaussianSection = field(default_factory=LinearGaussianSection)
    bayesian_gmm: BayesianGMMSection = field(default_factory=BayesianGMMSection)
    experiment: ExperimentSection = field(default_factory=ExperimentSection)

    @classmethod
    def from_dict(cls, raw, source: str = "config") -> "CompareConfig":
        config = cls(**parse_sections(raw, _COMPARE_SECTIONS, source))
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        c = self.compare
        for p in c.problems:
            if p not in PROBLEMS:
                raise ConfigError(f"{source}: [compare].problems: {UnknownNameError('problem', p, PROBLEMS)}")
        if "experiment" in c.problems and not self.experiment.config:
            raise ConfigError(f"{source}: problem 'experiment' needs [experiment].config, the path of a "
                              "`ppl-models fit` config (its model, guide and data are compared)")
        for e in c.estimators:
            if e not in ESTIMATOR_NAMES:
                unknown = UnknownNameError("estimator", e, ESTIMATOR_NAMES)
                raise ConfigError(f"{source}: [compare].estimators: {unknown}")
        positive = [
            ("gradients", "num_draws"), ("gradients", "batch_size"),
            ("training", "batch_size"), ("training", "eval_every"), ("training", "eval_particles"),
            ("training", "eval_size"), ("training", "num_samples"), ("compare", "threads"),
        ]
        for section, key in positive:
            if getattr(getattr(self, section), key) < 1:
                value = getattr(getattr(self, section), key)
                raise ConfigError(f"{source}: [{section}].{key}: expected an integer >= 1, received {value}")
        if self.training.num_seeds < 0:
            raise ConfigError(f"{source}: [training].num_seeds: expected an integer >= 0 (0: gradients only), "
                              f"received {self.training.num_seeds}")
        if self.training.num_samples < 2:
            raise ConfigError(f"{source}: [training].num_samples: k̂ needs at least 2 importance samples")
        if self.vae.data not in ("mnist", "simulated"):
            raise ConfigError(f"{source}: [vae].data: expected 'mnist' or 'simulated', received {self.vae.data!r}")
        for k in self.bayesian_gmm.compare_components:
            if not isinstance(k, int) or k < 1:
                raise ConfigError(
                    f"{source}: [bayesian_gmm].compare_components: expected integers >= 1, received {k!r}"
                )

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _COMPARE_SECTIONS}


def load_compare_config(path, overrides: typing.Mapping | None = None) -> CompareConfig:
    """Read a comparison TOML file; ``overrides`` are dotted keys, e.g. ``{"training.num_steps": 100}``."""
    path = Path(path)
    raw = read_toml(path)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r}: expected SECTION.KEY=VALUE, e.g. training.num_steps=100")
        if section not in _COMPARE_SECTIONS:
            raise ConfigError(f"override {dotted!r}: {UnknownNameError('section', section, _COMPARE_SECTIONS)}")
        raw.setdefault(section, {})[key] = value
    return CompareConfig.from_dict(raw, source=str(path))


# ---------------------------------------------------------------------------------------------------------
# The Bayesian GMM's guide over its global latents
# ---------------------------------------------------------------------------------------------------------


class BayesianGMMGuideParams(nn.Module):
    r"""Variational parameters of :func:`bayesian_gmm_guide`: a Dirichlet over :math:`\pi` and, per component,
    Normal locations and LogNormal scales (all mean-field; positive quantities through a softplus).

    :param num_components: :math:`K`.
    :param data_dim: :math:`D`.
    :param init_locs: initial location means, shape ``(K, D)`` (e.g. k-means++ seeds).
    :param init_log_scales: initial means of :math:`\log\sigma_{kd}`, shape ``(K, D)`` or broadcastable.
    :param init_sd: initial standard deviation of the locations and of :math:`\log\sigma` under ``q``.
    """

    def __init__(self, num_components: int, data_dim: int, init_locs: torch.Tensor, init_log_scales=0.0, init_sd=0.1):
        super().__init__()
        K, D = num_components, data_dim
        inv_sp = math.log(math.expm1(init_sd))
        self.num_components, self.data_dim = K, D
        self.weights_raw = nn.Parameter(torch.full((K,), math.log(math.expm1(10.0))))
        self.locs_loc = nn.Parameter(init_locs.detach().clone().reshape(K, D))
        self.locs_scale_raw = nn.Parameter(torch.full((K, D), inv_sp))
        log_scales = torch.as_tensor(init_log_scales, dtype=torch.get_default_dtype())
        self.scales_loc = nn.Parameter(torch.broadcast_to(log_scales, (K, D)).clone())
        self.scales_scale_raw = nn.Parameter(torch.full((K, D), inv_sp))


def bayesian_gmm_guide(
    x: torch.Tensor, idx: torch.Tensor | None = None, *, q_globals: BayesianGMMGuideParams, num_data: int | None = None
):
    r"""Mean-field :math:`q(\pi)\prod_k q(\mu_k) q(\sigma_k)` over the global latents of
    :func:`ppl_models.gmm.bayesian_model` (whose ``z`` is summed out); same signature.

    1. :math:`\pi \sim \mathrm{Dirichlet}(\mathrm{softplus}(a))`
    2. :math:`\mu_k \sim \mathcal{N}(m_k, \mathrm{diag}(\mathrm{softplus}(s_k)^2))`
    3. :math:`\sigma_k \sim \mathrm{LogNormal}(u_k, \mathrm{softplus}(v_k))`

    :param x: observations ``(batch, D)`` (unused but for the signature).
    :param q_globals: the :class:`BayesianGMMGuideParams` (registered as ``"q_globals"``).

    (It belongs in :mod:`ppl_models.guides.gmm`; it lives here because that file is not this module's to edit.)
    """
    pyro.module("q_globals", q_globals)
    K = q_globals.num_components
    pyro.sample("weights", dist.Dirichlet(F.softplus(q_globals.weights_raw)))
    with pyro.plate("components", K, dim=-1):
        pyro.sample("locs", dist.Normal(q_globals.locs_loc, F.softplus(q_globals.locs_scale_raw)).to_event(1))
        pyro.sample("scales", dist.LogNormal(q_globals.scales_loc, F.softplus(q_globals.scales_scale_raw)).to_event(1))


# ---------------------------------------------------------------------------------------------------------
# Exact ELBOs (for the exact gradient)
# ---------------------------------------------------------------------------------------------------------


def linear_gaussian_exact_elbo(params, guide: Callable, x: torch.Tensor, idx=None) -> torch.Tensor:
    r"""The exact ELBO :math:`\sum_i \mathbb{E}_{q}[\log p(x_i, z_i)] + H[q_i]` of the linear-Gaussian model for a
    Gaussian guide (``Normal(...).to_event(1)`` or ``MultivariateNormal`` at site ``z``), differentiable in the
    model's and the guide's parameters.  With :math:`q_i = \mathcal{N}(m_i, C_i)`:

    .. math:: \mathbb{E}_q \log \mathcal{N}(x_i; W z + b, \sigma^2 I) = -\tfrac{D}{2}\log(2\pi\sigma^2)
              - \frac{\lVert x_i - W m_i - b\rVert^2 + \mathrm{tr}(W C_i W^\top)}{2\sigma^2},

    .. math:: \mathbb{E}_q \log \mathcal{N}(z; 0, I) = -\tfrac{d}{2}\log 2\pi
              - \tfrac12(\lVert m_i\rVert^2 + \mathrm{tr}\, C_i).

    :param params: the model's :class:`~ppl_models.linear_gaussian.LinearGaussianParams`.
    :param guide: the guide (bound to its networks), called as ``guide(x, idx)``.
    :param x: ``(batch, x_dim)``; ``idx``: ``(batch,)`` or ``None``.
    """
    with poutine.block():
        trace = poutine.trace(guide).get_trace(x, idx)
    fn = trace.nodes["z"]["fn"]
    base = fn.base_dist if isinstance(fn, torch.distributions.Independent) else fn
    if isinstance(base, dist.Normal):
        m, var = base.loc, base.scale**2  # (batch, d)
        tr_cov = var.sum(-1)
        tr_wcw = (var[..., None, :] * params.W**2).sum((-1, -2))
    elif isinstance(base, dist.MultivariateNormal):
        m, cov = base.loc, base.covariance_matrix
        tr_cov = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        tr_wcw = (params.W @ cov @ params.W.T).diagonal(dim1=-2, dim2=-1).sum(-1)
    else:
        raise NotImplementedError(
            f"linear_gaussian_exact_elbo: guide site 'z' is a {type(base).__name__}, "
            "expected Normal or MultivariateNormal"
        )
    D, d = params.x_dim, params.z_dim
    sigma2 = params.sigma**2
    resid = x - m @ params.W.T - params.b
    e_lik = -0.5 * D * torch.log(2 * math.pi * sigma2) - (resid.pow(2).sum(-1) + tr_wcw) / (2 * sigma2)
    e_prior = -0.5 * d * math.log(2 * math.pi) - 0.5 * (m.pow(2).sum(-1) + tr_cov)
    return (e_lik + e_prior + fn.entropy().expand(x.shape[0])).sum()


def enumerated_exact_elbo(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, max_plate_nesting: int
) -> torch.Tensor:
    """The exact ELBO when every guide site is discrete with finite support: ``TraceEnum_ELBO`` with the guide's
    sites enumerated in parallel sums over all their values (differentiable)."""
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=max_plate_nesting)
    return -elbo.differentiable_loss(model, pyro.infer.config_enumerate(guide, "parallel"), *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """A model, its guide and data, ready for the comparison.

    ``instance`` holds the bound model and guide; ``dataset`` the training data; ``grad_args`` /
    ``grad_kwargs`` the fixed batch of the gradient statistics; ``eval_args`` the fixed evaluation set
    (with ``idx``); ``exact_elbo(args, kwargs)`` the exact ELBO (``None``: not computable);
    ``guide_modules`` the names of the guide's networks.
    """

    name: str
    instance: registry.Instance
    dataset: TensorDataset
    grad_args: tuple
    grad_kwargs: dict
    eval_args: tuple
    exact_elbo: Optional[Callable] = None
    guide_modules: tuple = ()
    local: bool = True  # latents per datapoint (importance-sampled log-likelihood per datapoint)
    enumerated: bool = False
    lr: Optional[float] = None
    info: dict = field(default_factory=dict)


def _guide_module_names(instance) -> tuple:
    keywords = getattr(instance.guide, "keywords", {}) or {}
    return tuple(k for k, v in keywords.items() if isinstance(v, nn.Module))


def _simulated_vae_data(cfg: VAESection, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 + seed)
    from ppl_models.vae import Decoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + seed)
        decoder = Decoder(cfg.z_dim, cfg.hidden_dims, cfg.x_dim)
        with torch.no_grad():
            for p in decoder.parameters():
                p.mul_(3.0)  # a decoder with structure (the default initialisation gives pixels near 0.5)
            z = torch.randn(cfg.num_data, cfg.z_dim, generator=gen)
            probs = torch.sigmoid(decoder(z))
    return torch.bernoulli(probs, generator=gen)


_VAE_DATA_CACHE: dict = {}


def _vae_data(cfg: VAESection, seed: int):
    """Training and evaluation images, binarized once (the same for every estimator and seed); cached."""
    key = (cfg.data, cfg.num_data, cfg.z_dim, tuple(cfg.hidden_dims), cfg.x_dim, seed)
    if key not in _VAE_DATA_CACHE:
        _VAE_DATA_CACHE.clear()
        _VAE_DATA_CACHE[key] = _load_vae_data(cfg, seed)
    return _VAE_DATA_CACHE[key]


def _load_vae_data(cfg: VAESection, seed: int):
    if cfg.data == "simulated":
        x = _simulated_vae_data(cfg, seed)
        return x, x[: min(cfg.num_data, 500)]
    from ppl_models.data import mnist_splits

    splits = mnist_splits("dynamic")
    gen = torch.Generator().manual_seed(seed)
    n_train = min(cfg.num_data, int(splits["train"].num_data))
    x = splits["train"].batch(torch.arange(n_train), gen)[0]  # binarized once: fixed data for every estimator
    n_test = min(500, int(splits["test"].num_data))
    x_test = splits["test"].batch(torch.arange(n_test), gen)[0]
    return x.float(), x_test.float()


def _true_gmm(num_components: int, data_dim: int, separation: float, seed: int):
    from ppl_models import gmm

    gen = torch.Generator().manual_seed(20_000 + seed)
    truth = gmm.GMMParams(num_components, data_dim, learn_weights=True)
    locs = torch.randn(num_components, data_dim, generator=gen) * separation
    truth.set_locs(locs).set_scales(0.5 + torch.rand(num_components, data_dim, generator=gen))
    return truth


def build_problem(name: str, config: CompareConfig, seed: int) -> Problem:
    """Data (fixed by ``[compare].seed``) and a fresh model + guide initialised from ``seed``."""
    if name not in PROBLEMS:
        raise UnknownNameError("problem", name, PROBLEMS)
    data_seed = config.compare.seed
    B = config.gradients.batch_size
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    if name == "experiment":
        return _experiment_problem(config, seed)
    if name == "vae":
        cfg = config.vae
        x, x_eval = _vae_data(cfg, data_seed)
        x_eval = x_eval[: config.training.eval_size]
        pyro.set_rng_seed(seed)
        inst = registry.instantiate(
            "vae", "amortized", num_data=x.shape[0],
            model_kwargs={"z_dim": cfg.z_dim, "hidden_dims": list(cfg.hidden_dims), "x_dim": x.shape[1]},
            guide_kwargs={"hidden_dims": list(cfg.hidden_dims)},
        )
        xb = x[:B]
        return Problem(name, inst, TensorDataset(x), (xb, None), {}, (x_eval, None), None, _guide_module_names(inst),
                       info={"data": cfg.data, "num_data": x.shape[0]})
    if name == "gmm":
        from ppl_models import gmm

        cfg = config.gmm
        truth = _true_gmm(cfg.num_components, cfg.data_dim, cfg.separation, data_seed)
        x, _ = gmm.simulate(truth, cfg.num_data, torch.Generator().manual_seed(data_seed))
        inst = registry.instantiate("gmm", "mean-field", num_data=cfg.num_data,
                                    model_kwargs={"num_components": cfg.num_components, "data_dim": cfg.data_dim})
        inst.modules["params"].init_from_data(x, torch.Generator().manual_seed(seed))
        n = min(B, cfg.num_data)
        idx = torch.arange(n)
        ev = torch.arange(min(cfg.num_data, config.training.eval_size))

        def exact(args, kwargs):
            return enumerated_exact_elbo(inst.model, inst.guide, args, kwargs, 1)

        return Problem(name, inst, TensorDataset(x), (x[idx], idx), {}, (x[ev], ev), exact, _guide_module_names(inst),
                       lr=0.05, info={"num_data": cfg.num_data, "K": cfg.num_components})
    if name == "linear-gaussian":
        from ppl_models import linear_gaussian as lg

        cfg = config.linear_gaussian
        gen = torch.Generator().manual_seed(30_000 + data_seed)
        truth = lg.LinearGaussianParams(cfg.z_dim, cfg.x_dim, generator=gen, init_sigma=0.5, bias_scale=1.0)
        x, _ = lg.simulate(truth, cfg.num_data, torch.Generator().manual_seed(data_seed))
        inst = registry.instantiate("linear-gaussian", "mean-field", num_data=cfg.num_data,
                                    model_kwargs={"z_dim": cfg.z_dim, "x_dim": cfg.x_dim, "seed": 40_000 + seed},
                                    guide_kwargs={"init_scale": 0.5})
        params = inst.modules["params"]
        n = min(B, cfg.num_data)
        idx = torch.arange(n)
        ev = torch.arange(min(cfg.num_data, config.training.eval_size))

        def exact(args, kwargs):
            return linear_gaussian_exact_elbo(params, inst.guide, args[0], args[1])

        return Problem(name, inst, TensorDataset(x), (x[idx], idx), {}, (x[ev], ev), exact, _guide_module_names(inst),
                       lr=0.02, info={"num_data": cfg.num_data})
    # bayesian-gmm
    from ppl_models import gmm

    cfg = config.bayesian_gmm
    x = _bayesian_gmm_data(cfg, data_seed)
    return _bayesian_gmm_problem(config, x, cfg.num_components, seed)


def _experiment_problem(config: CompareConfig, seed: int) -> Problem:
    """The model, guide and training data of a ``ppl-models fit`` config (:class:`ppl_models.app.experiment.Experiment`),
    its networks initialised from ``seed``; the data (one tensor per datapoint, drawn once with ``[compare].seed``)
    are the same for every estimator and seed."""
    from ppl_models.app.experiment import Experiment

    path = config.experiment.config
    experiment = Experiment.from_file(path, overrides={"train.seed": seed})
    splits = experiment.load_data()
    train = splits["train"]
    N = int(train.num_data)
    instance = experiment.build(N)  # clears the param store and seeds Pyro with the run's (overridden) seed
    data = train.batch(torch.arange(N), torch.Generator().manual_seed(config.compare.seed))
    if len(data) != 1:
        raise ConfigError(f"[experiment].config {path}: the comparison takes models of one observed tensor "
                          f"model(x, idx, ...); data set {experiment.config.data.name!r} yields {len(data)} tensors")
    (x,) = data
    idx = torch.arange(min(config.gradients.batch_size, N))
    ev = torch.arange(min(config.training.eval_size, N))
    return Problem("experiment", instance, TensorDataset(x), (x[idx], idx), {}, (x[ev], ev), None,
                   _guide_module_names(instance),
                   info={"config": str(path), "model": instance.model_name, "guide": instance.guide_name,
                         "num_data": N})


def _bayesian_gmm_data(cfg: BayesianGMMSection, data_seed: int) -> torch.Tensor:
    from ppl_models import gmm

    truth = _true_gmm(cfg.true_components, cfg.data_dim, cfg.separation, data_seed)
    x, _ = gmm.simulate(truth, cfg.num_data, torch.Generator().manual_seed(data_seed))
    return x


def _bayesian_gmm_problem(config: CompareConfig, x: torch.Tensor, K: int, seed: int) -> Problem:
    from ppl_models import gmm

    cfg = config.bayesian_gmm
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    inst = registry.instantiate("bayesian-gmm", None, num_data=x.shape[0],
                                model_kwargs={"num_components": K, "data_dim": cfg.data_dim, "loc_scale": 10.0})
    start = gmm.GMMParams(K, cfg.data_dim).init_from_data(x, torch.Generator().manual_seed(seed))
    q = BayesianGMMGuideParams(K, cfg.data_dim, start.locs, start.log_scales.detach())
    guide = _bind(bayesian_gmm_guide, q_globals=q)
    inst.guide, inst.guide_name = guide, "mean-field-globals"
    inst.modules["q_globals"] = q
    return Problem("bayesian-gmm", inst, TensorDataset(x), (x, None), {}, (x, None), None, ("q_globals",),
                   local=False, enumerated=True, lr=cfg.lr,
                   info={"num_data": x.shape[0], "K": K, "init_locs": start.locs.detach().clone()})


def _bind(fn, **modules):
    import functools

    bound = functools.partial(fn, **modules)
    functools.update_wrapper(bound, fn)
    return bound


# ---------------------------------------------------------------------------------------------------------
# Gradient statistics at fixed parameters
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GradientStats:
    """One estimator's gradients at fixed parameters: per parameter tensor (flattened) the mean, the variance
    (``ddof=1``) over ``num_draws`` draws, the exact gradient (``None`` where unknown) and the role
    (``"guide"`` or ``"model"``); the mean CPU time of one gradient (``cost_s``, one draw; with one torch thread
    the compute cost, unaffected by other processes on the machine)."""

    problem: str
    estimator: str
    target: str
    num_draws: int
    cost_s: float
    loss_mean: float
    mean: Dict[str, np.ndarray]
    var: Dict[str, np.ndarray]
    exact: Dict[str, Optional[np.ndarray]]
    role: Dict[str, str]

    def z_scores(self, name: str) -> Optional[np.ndarray]:
        """``(mean - exact) / sqrt(var / num_draws)`` per element (``None`` without an exact gradient)."""
        exact = self.exact.get(name)
        if exact is None:
            return None
        se = np.sqrt(self.var[name] / self.num_draws)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (self.mean[name] - exact) / se
        # Elements whose gradient is exactly zero in every draw and exactly: z = 0.
        return np.where((se == 0) & (self.mean[name] == exact), 0.0, z)

    def summary(self, role: str) -> dict:
        """Aggregates over the elements of the ``role``'s parameters: mean variance per element, total variance,
        mean and median SNR, the largest |z| against the exact gradient."""
        names = [n for n, r in self.role.items() if r == role]
        if not names:
            return {}
        mean = np.concatenate([self.mean[n] for n in names])
        var = np.concatenate([self.var[n] for n in names])
        sd = np.sqrt(var)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(sd > 0, np.abs(mean) / sd, np.nan)
        zs = [self.z_scores(n) for n in names]
        out = {
            "numel": int(mean.size),
            "mean_variance": float(var.mean()),
            "total_variance": float(var.sum()),
            "mean_snr": float(np.nanmean(snr)) if np.isfinite(snr).any() else float("nan"),
            "median_snr": float(np.nanmedian(snr)) if np.isfinite(snr).any() else float("nan"),
            "max_abs_z": float(np.nanmax(np.abs(np.concatenate(zs)))) if all(z is not None for z in zs) else None,
        }
        return out


def _dense_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    if g is None:
        return torch.zeros(p.numel(), dtype=torch.float64)
    if g.is_sparse:
        g = g.coalesce().to_dense()
    return g.detach().reshape(-1).double()


def _measured_params(problem: Problem, estimator: Estimator) -> Dict[str, str]:
    """Model and guide parameters by name -> role (baselines excluded)."""
    aux = set(estimator.auxiliary_param_names())
    roles = {}
    for name in pyro.get_param_store().keys():
        if name in aux:
            continue
        module = name.split("$$$", 1)[0]
        roles[name] = "guide" if module in problem.guide_modules else "model"
    return roles


def _zero_grads() -> None:
    for p in pyro.get_param_store().values():
        p.grad = None


def exact_gradient(problem: Problem, names) -> Optional[Dict[str, np.ndarray]]:
    """The exact gradient of :math:`-\\mathrm{ELBO}` on the fixed batch (``None`` where it is not computable)."""
    if problem.exact_elbo is None:
        return None
    store = pyro.get_param_store()
    _zero_grads()
    (-problem.exact_elbo(problem.grad_args, problem.grad_kwargs)).backward()
    out = {n: _dense_grad(store[n]).numpy().copy() for n in names}
    _zero_grads()
    return out


def gradient_statistics(
    problem: Problem,
    estimator: Estimator,
    *,
    num_draws: int,
    warmup: int = 0,
    baseline_lr: float = 1e-2,
    progress: bool = False,
) -> GradientStats:
    """Draw ``num_draws`` independent gradients of the loss at the current (fixed) parameters.

    Model and guide parameters are never updated; a neural baseline is trained (Adam, ``baseline_lr``) during
    ``warmup`` draws and keeps adapting while measuring, the decaying-average baseline updates itself.
    """
    store = pyro.get_param_store()
    args, kwargs = problem.grad_args, problem.grad_kwargs
    baseline_opt = None

    def one_draw():
        nonlocal baseline_opt
        _zero_grads()
        t0 = time.process_time()  # CPU time: on a shared machine wall time measures the neighbours
        loss = estimator.loss_and_grads(*args, **kwargs)
        elapsed = time.process_time() - t0
        if estimator.modules and baseline_opt is None:
            params = [p for m in estimator.modules.values() for p in m.parameters()]
            baseline_opt = torch.optim.Adam(params, lr=baseline_lr)
        if baseline_opt is not None:
            baseline_opt.step()
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"{problem.name}/{estimator.name}: non-finite loss {loss} while measuring gradients"
            )
        return loss, elapsed

    for _ in range(warmup):
        one_draw()
    one_draw()  # registers every parameter (and the average baseline)
    roles = _measured_params(problem, estimator)
    names = sorted(roles)
    sums = {n: torch.zeros(store[n].numel(), dtype=torch.float64) for n in names}
    sq = {n: torch.zeros(store[n].numel(), dtype=torch.float64) for n in names}
    total_time, total_loss = 0.0, 0.0
    for i in range(num_draws):
        loss, elapsed = one_draw()
        total_time += elapsed
        total_loss += loss
        for n in names:
            g = _dense_grad(store[n])
            sums[n] += g
            sq[n] += g * g
        if progress and (i + 1) % max(1, num_draws // 4) == 0:
            print(f"  {problem.name}/{estimator.name}: {i + 1}/{num_draws} draws", file=sys.stderr, flush=True)
    _zero_grads()
    mean = {n: (sums[n] / num_draws).numpy() for n in names}
    var = {
        n: ((sq[n] - num_draws * (sums[n] / num_draws) ** 2) / max(1, num_draws - 1)).clamp_min(0).numpy()
        for n in names
    }
    exact = exact_gradient(problem, names) if estimator.target == "ELBO" else None
    return GradientStats(
        problem.name, estimator.name, estimator.target, num_draws, total_time / num_draws, total_loss / num_draws,
        mean, var, {n: (exact[n] if exact is not None else None) for n in names}, roles,
    )


# ---------------------------------------------------------------------------------------------------------
# Training with an estimator
# ---------------------------------------------------------------------------------------------------------


def common_elbo(problem: Problem, num_particles: int, seed: int) -> float:
    """The ELBO per datapoint of the problem's current guide on its fixed evaluation set, the same objective for
    every estimator: exact where :attr:`Problem.exact_elbo` is known, else ``num_particles`` draws."""
    args = problem.eval_args
    n = args[0].shape[0]
    model, guide = problem.instance.model, problem.instance.guide
    with torch.no_grad(), torch.random.fork_rng(devices=[]), poutine.block():
        torch.manual_seed(seed)
        if problem.exact_elbo is not None:
            with torch.enable_grad():  # TraceEnum_ELBO.differentiable_loss insists; nothing is backpropagated
                value = float(problem.exact_elbo(args, {}).detach())
        else:
            if problem.enumerated:  # the Bayesian GMM indexes its global latents: no vectorized particles
                elbo = pyro.infer.TraceEnum_ELBO(
                    num_particles=num_particles, vectorize_particles=False, max_plate_nesting=1
                )
            else:
                elbo = pyro.infer.Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=2)
            value = -float(elbo.loss(model, guide, *args))
    return value / n


@dataclass
class TrainResult:
    estimator: str
    seed: int
    steps: List[int]
    elbo: List[float]
    wall_time_s: float


def _trainer_for(problem: Problem, estimator: Estimator, *, num_steps: int, batch_size: int, lr: float, seed: int,
                 callback=None):
    from ppl_models.infer import Trainer

    N = problem.dataset.num_data
    if estimator.name == "score-function-avg-baseline" and N % batch_size:
        raise EstimatorError(
            f"estimator 'score-function-avg-baseline': its average baseline has one entry per position in the batch, "
            f"so every batch must have the same size: num_data={N} is not a multiple of batch_size={batch_size}"
        )

    def step(trainer, args, idx):
        trainer._optim.zero_grad()
        loss = estimator.loss_and_grads(*args, idx, num_data=trainer.num_data)
        if not math.isfinite(loss):
            trainer._raise_non_finite(loss, args, idx)
        trainer._optim.step()
        return loss

    return Trainer(
        problem.instance.model, estimator.guide, problem.dataset,
        elbo="TraceEnum_ELBO" if problem.enumerated else "Trace_ELBO",
        lr=lr, batch_size=min(batch_size, N), num_epochs=10**9, max_steps=num_steps, seed=seed, progress=False,
        step_fn=step, callback=callback, log_every=10**9,
    )


def _estimator_for(problem: Problem, name: str, config: CompareConfig, guide=None) -> Estimator:
    x = problem.grad_args[0]
    idx = problem.grad_args[1]
    return make_estimator(
        name, problem.instance.model, guide or problem.instance.guide, (x, idx), {},
        num_particles=config.gradients.iwae_particles if name == "iwae" else 1,
        data_plate=problem.instance.spec.data_plate,
    )


def pretrain(problem: Problem, config: CompareConfig, seed: int) -> None:
    """``[gradients].pretrain_steps`` Adam steps with the first estimator that applies (reparameterized, else
    score-function with an average baseline), so the gradients are measured away from the initialisation."""
    steps = config.gradients.pretrain_steps
    if steps <= 0:
        return
    for name in ("reparameterized", "score-function-nn-baseline", "score-function"):
        try:
            est = _estimator_for(problem, name, config)
            break
        except EstimatorError:
            continue
    trainer = _trainer_for(problem, est, num_steps=steps, batch_size=config.training.batch_size,
                           lr=problem.lr or config.gradients.pretrain_lr, seed=seed)
    trainer.fit()
    # The pretraining's own baseline (if any) is not part of the measured estimators.
    store = pyro.get_param_store()
    for n in [n for n in store.keys() if n.startswith("nn_baseline$$$") or n.startswith("__baseline")]:
        del store[n]


def train_estimator(problem: Problem, name: str, config: CompareConfig, seed: int) -> TrainResult:
    """Train the problem's model and guide (fresh from ``seed``) with estimator ``name``; the common ELBO every
    ``eval_every`` steps."""
    t = config.training
    est = _estimator_for(problem, name, config)
    steps, values = [0], [common_elbo(problem, t.eval_particles, seed)]

    def callback(trainer, step, loss):
        if step % t.eval_every == 0 or step == t.num_steps:
            steps.append(step)
            values.append(common_elbo(problem, t.eval_particles, seed + step))

    trainer = _trainer_for(problem, est, num_steps=t.num_steps, batch_size=t.batch_size, lr=problem.lr or t.lr,
                           seed=seed, callback=callback)
    start = time.perf_counter()
    trainer.fit()
    return TrainResult(name, seed, steps, values, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------
# Final q: pointwise log-likelihood and k̂
# ---------------------------------------------------------------------------------------------------------


def local_pointwise(problem: Problem, num_samples: int, seed: int):
    """IWAE log-likelihood and PSIS k̂ per datapoint of the evaluation set, from ``num_samples`` draws of the guide.

    :return: ``(log_lik, khat)``, each a float64 array of shape ``(n,)``.
    """
    from ppl_models.infer.evaluate import log_weights

    x, idx = problem.eval_args
    with torch.random.fork_rng(devices=[]), poutine.block():
        torch.manual_seed(seed)
        lw = log_weights(problem.instance.model, problem.instance.guide, x, idx, num_samples=num_samples,
                         spec=problem.instance.spec)
    lw = lw.double()
    log_lik = (torch.logsumexp(lw, 0) - math.log(num_samples)).numpy()
    return log_lik, diagnostics.psis_khat(lw.T.numpy())


def canonical_order(draws: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Sort mixture components of every draw by the first coordinate of their location (label switching)."""
    order = np.argsort(draws["locs"][..., 0], axis=-1)
    out = {
        "weights": np.take_along_axis(draws["weights"], order, -1),
        "locs": np.take_along_axis(draws["locs"], order[..., None], -2),
        "scales": np.take_along_axis(draws["scales"], order[..., None], -2),
    }
    return out


def mixture_pointwise_log_lik(x: torch.Tensor, weights, locs, scales) -> torch.Tensor:
    r"""The pointwise log-likelihood of a mixture for every draw :math:`\theta_s`:
    :math:`\log p(x_i \mid \theta_s) = \log \sum_k \pi_{sk} \mathcal{N}(x_i; \mu_{sk}, \mathrm{diag}\,\sigma_{sk}^2)`.

    :param x: ``(n, D)``; ``weights`` ``(S, K)``, ``locs`` and ``scales`` ``(S, K, D)``.
    :return: ``(S, n)``.
    """
    comp = dist.Normal(locs[:, None], scales[:, None]).log_prob(x[None, :, None, :]).sum(-1)  # (S, n, K)
    return torch.logsumexp(comp + torch.log(weights)[:, None, :], -1)


def _bayes_log_prior(prior, weights, locs, scales) -> torch.Tensor:
    K = weights.shape[-1]
    return (
        dist.Dirichlet(prior.concentration.expand(K)).log_prob(weights)
        + dist.Normal(prior.loc_loc, prior.loc_scale).log_prob(locs).sum((-1, -2))
        + dist.LogNormal(prior.scale_loc, prior.scale_scale).log_prob(scales).sum((-1, -2))
    )


@torch.no_grad()
def bayesian_gmm_q_draws(problem: Problem, num_draws: int, seed: int):
    """Draws :math:`\\theta_s \\sim q` of the global latents, their log importance weights
    :math:`\\log p(x, \\theta_s) - \\log q(\\theta_s)`, the global PSIS k̂ and, by sampling-importance-resampling
    with the smoothed weights, the pointwise log-likelihood ``(num_draws, n)`` (see the module docstring)."""
    x = problem.eval_args[0]
    prior = problem.instance.modules["prior"]
    draws = {"weights": [], "locs": [], "scales": []}
    log_q = []
    with torch.random.fork_rng(devices=[]), poutine.block():
        torch.manual_seed(seed)
        for _ in range(num_draws):
            tr = poutine.trace(problem.instance.guide).get_trace(x, None)
            for k in draws:
                draws[k].append(tr.nodes[k]["value"])
            log_q.append(sum(tr.nodes[k]["fn"].log_prob(tr.nodes[k]["value"]).sum() for k in draws))
        d = {k: torch.stack(v) for k, v in draws.items()}
        log_lik = mixture_pointwise_log_lik(x, d["weights"], d["locs"], d["scales"])  # (S, n)
        lw = _bayes_log_prior(prior, d["weights"], d["locs"], d["scales"]) + log_lik.sum(-1) - torch.stack(log_q)
        lw_np = lw.double().numpy()
        smoothed_lw, khat = diagnostics.psis_smooth(lw_np)
        smoothed = np.exp(smoothed_lw - smoothed_lw.max())
        gen = torch.Generator().manual_seed(seed)
        pick = torch.multinomial(torch.as_tensor(smoothed), num_draws, replacement=True, generator=gen)
    return {k: v.numpy() for k, v in d.items()}, log_lik[pick].double().numpy(), khat, lw_np


def run_nuts_bayesian_gmm(problem: Problem, num_warmup: int, num_samples: int, seed: int, max_tree_depth: int = 10):
    """NUTS on the collapsed Bayesian GMM (``z`` summed out), started at the guide's initial locations.

    :return: the :class:`pyro.infer.MCMC` object, its draws as numpy arrays, the pointwise log-likelihood
        ``(num_samples, n)`` and the wall time.
    """
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide.initialization import init_to_value

    x = problem.eval_args[0]
    start = problem.info["init_locs"]
    with torch.random.fork_rng(devices=[]):
        pyro.set_rng_seed(seed)
        kernel = NUTS(problem.instance.model, max_plate_nesting=1, max_tree_depth=max_tree_depth,
                      init_strategy=init_to_value(values={"locs": start}))
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup, disable_progbar=True)
        t0 = time.perf_counter()
        mcmc.run(x)
        wall = time.perf_counter() - t0
    samples = {k: v.detach() for k, v in mcmc.get_samples().items()}
    with torch.no_grad():
        log_lik = mixture_pointwise_log_lik(x, samples["weights"], samples["locs"], samples["scales"])
    return mcmc, {k: v.numpy() for k, v in samples.items()}, log_lik.double().numpy(), wall


def run_nuts_linear_gaussian(problem: Problem, num_points: int, num_warmup: int, num_samples: int, seed: int,
                             max_tree_depth: int = 10):
    """NUTS over the latents ``z`` of the first ``num_points`` datapoints with the model's parameters fixed.

    :return: the MCMC object, draws of ``z`` ``(num_samples, num_points, z_dim)`` and the wall time.
    """
    from pyro.infer import MCMC, NUTS

    x = problem.dataset.tensors[0][:num_points]
    with torch.random.fork_rng(devices=[]):
        pyro.set_rng_seed(seed)
        kernel = NUTS(problem.instance.model, max_plate_nesting=1, max_tree_depth=max_tree_depth)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup,
                    disable_progbar=True)
        t0 = time.perf_counter()
        mcmc.run(x)
        wall = time.perf_counter() - t0
    return mcmc, mcmc.get_samples()["z"].detach().numpy(), wall


# ---------------------------------------------------------------------------------------------------------
# The whole comparison
# ---------------------------------------------------------------------------------------------------------


def _log(config: CompareConfig, message: str) -> None:
    if config.compare.progress:
        print(message, file=sys.stderr, flush=True)


def _snapshot(problem: Problem) -> dict:
    return {k: v.detach().clone() for k, v in problem.instance.modules.state_dict().items()}


def _restore(problem: Problem, state: dict) -> None:
    with torch.no_grad():
        problem.instance.modules.load_state_dict(state)
    store = pyro.get_param_store()
    for n in [n for n in store.keys() if n.startswith("nn_baseline$$$") or n.startswith("__baseline")]:
        del store[n]


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _md_table(rows: List[dict], columns: List[str]) -> str:
    """A markdown table; a ``status`` "n/a: reason" is shown as "n/a (k)" with the reasons listed below."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    reasons: List[str] = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            if c == "status" and isinstance(v, str) and v.startswith("n/a: "):
                reason = v[len("n/a: "):]
                if reason not in reasons:
                    reasons.append(reason)
                v = f"n/a ({reasons.index(reason) + 1})"
            cells.append(_fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"({i + 1}) {reason}" for i, reason in enumerate(reasons)]
    return "\n".join(lines) + "\n" + ("\n" + "\n\n".join(notes) + "\n" if notes else "")


def _write_csv(path: Path, rows: List[dict], columns: List[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue().encode()))


GRADIENT_COLUMNS = [
    "problem", "estimator", "target", "status", "cpu_ms_per_gradient", "guide_mean_variance", "guide_mean_snr",
    "guide_median_snr", "guide_max_abs_z", "variance_ratio_to_reparameterized", "model_mean_variance",
    "model_mean_snr", "model_max_abs_z", "num_draws",
]
TRAINING_COLUMNS = [
    "problem", "estimator", "status", "num_seeds", "final_elbo_mean", "final_elbo_sd", "elbo_rhat",
    "log_lik_mean", "khat_mean", "khat_frac_good", "khat_frac_bad", "khat_frac_undetermined", "global_khat",
    "wall_s_per_run",
]


def _gradient_rows(problem_name: str, config: CompareConfig, runs: dict) -> List[dict]:
    rows = []
    ref = None
    for name, item in runs.items():
        if isinstance(item, GradientStats) and name == "reparameterized":
            ref = item.summary("guide").get("mean_variance")
    for name, item in runs.items():
        if not isinstance(item, GradientStats):
            rows.append({"problem": problem_name, "estimator": name, "status": f"n/a: {item}"})
            continue
        g, m = item.summary("guide"), item.summary("model")
        rows.append({
            "problem": problem_name, "estimator": name, "target": item.target, "status": "ok",
            "cpu_ms_per_gradient": item.cost_s * 1e3, "guide_mean_variance": g.get("mean_variance"),
            "guide_mean_snr": g.get("mean_snr"), "guide_median_snr": g.get("median_snr"),
            "guide_max_abs_z": g.get("max_abs_z"),
            "variance_ratio_to_reparameterized": (g["mean_variance"] / ref) if ref else None,
            "model_mean_variance": m.get("mean_variance"), "model_mean_snr": m.get("mean_snr"),
            "model_max_abs_z": m.get("max_abs_z"), "num_draws": item.num_draws,
        })
    return rows


def _gradient_comparison(problem_name: str, config: CompareConfig) -> dict:
    g = config.gradients
    problem = build_problem(problem_name, config, config.compare.seed)
    pretrain(problem, config, config.compare.seed)
    state = _snapshot(problem)
    runs = {}
    for name in config.compare.estimators:
        _restore(problem, state)
        try:
            est = _estimator_for(problem, name, config)
        except EstimatorError as exc:
            runs[name] = str(exc).split("\n")[0]
            _log(config, f"[{problem_name}] gradients {name}: n/a ({runs[name]})")
            continue
        with torch.random.fork_rng(devices=[]):
            pyro.set_rng_seed(config.compare.seed + 1)
            stats = gradient_statistics(problem, est, num_draws=g.num_draws,
                                        warmup=g.warmup if est.modules or "baseline" in name else 0)
        runs[name] = stats
        s = stats.summary("guide")
        _log(config, f"[{problem_name}] gradients {name}: guide variance/element {s['mean_variance']:.4g}, "
                     f"mean SNR {s['mean_snr']:.3g}, {stats.cost_s * 1e3:.2f} ms per gradient")
    _restore(problem, state)
    return runs


def _training_comparison(problem_name: str, config: CompareConfig, run_dir: Path) -> dict:
    t = config.training
    results: dict = {}
    keep = None  # the seed-0 reparameterized problem (for the NUTS reference)
    for name in config.compare.estimators:
        seeds_out = []
        for s in range(t.num_seeds):
            seed = config.compare.seed + s
            problem = build_problem(problem_name, config, seed)
            try:
                tr = train_estimator(problem, name, config, seed)
            except EstimatorError as exc:
                seeds_out = str(exc).split("\n")[0]
                break
            out = {"train": tr}
            if problem.local:
                out["log_lik"], out["khat"] = local_pointwise(problem, t.num_samples, seed)
            else:
                draws, log_lik, khat, _ = bayesian_gmm_q_draws(problem, config.bayesian_gmm.num_draws, seed)
                out["draws"], out["log_lik"], out["global_khat"] = canonical_order(draws), log_lik, khat
            if s == 0 and name == "reparameterized":
                keep = problem
            seeds_out.append(out)
            _log(config, f"[{problem_name}] train {name} seed {seed}: ELBO {tr.elbo[-1]:.3f} after "
                         f"{tr.steps[-1]} steps ({tr.wall_time_s:.1f} s)")
        results[name] = seeds_out
        if isinstance(seeds_out, str):
            _log(config, f"[{problem_name}] train {name}: n/a ({seeds_out})")
    return {"results": results, "reference_problem": keep}


def _inference_data(problem_name: str, name: str, seeds_out: list):
    steps = np.asarray(seeds_out[0]["train"].steps)
    elbo = np.stack([np.asarray(o["train"].elbo) for o in seeds_out])[:, None, :]  # (seeds, 1, evals)
    sample_stats = {"elbo": elbo}
    dims = {"elbo": ["step"], "x": ["datapoint"]}
    coords = {"step": steps}
    posterior = None
    if "khat" in seeds_out[0]:
        sample_stats["pareto_khat"] = np.stack([o["khat"] for o in seeds_out])[:, None, :]
        log_lik = np.stack([o["log_lik"] for o in seeds_out])[:, None, :]
        dims["pareto_khat"] = ["datapoint"]
    else:
        posterior = {k: np.stack([o["draws"][k] for o in seeds_out]) for k in ("weights", "locs", "scales")}
        log_lik = np.stack([o["log_lik"] for o in seeds_out])
        dims.update({"weights": ["component"], "locs": ["component", "dim"], "scales": ["component", "dim"]})
    attrs = {"problem": problem_name, "estimator": name, "chains": "seeds"}
    if "global_khat" in seeds_out[0]:
        attrs["global_khat"] = [float(o["global_khat"]) for o in seeds_out]
    return diagnostics.draws_inference_data(posterior, sample_stats=sample_stats, log_likelihood={"x": log_lik},
                                            dims=dims, coords=coords, attrs=attrs)


def _training_rows(problem_name: str, results: dict, idatas: dict) -> List[dict]:
    rows = []
    for name, seeds_out in results.items():
        if isinstance(seeds_out, str):
            rows.append({"problem": problem_name, "estimator": name, "status": f"n/a: {seeds_out}"})
            continue
        final = np.array([o["train"].elbo[-1] for o in seeds_out])
        traces = np.stack([np.asarray(o["train"].elbo) for o in seeds_out])
        half = traces[:, traces.shape[1] // 2:]
        rhat = float(diagnostics.rhat({"elbo": half})["elbo"]) if len(seeds_out) > 1 and half.shape[1] >= 4 else None
        row = {
            "problem": problem_name, "estimator": name, "status": "ok", "num_seeds": len(seeds_out),
            "final_elbo_mean": float(final.mean()),
            "final_elbo_sd": float(final.std(ddof=1)) if len(final) > 1 else None,
            "elbo_rhat": rhat, "log_lik_mean": float(np.mean([o["log_lik"].mean() for o in seeds_out])),
            "wall_s_per_run": float(np.mean([o["train"].wall_time_s for o in seeds_out])),
        }
        if "khat" in seeds_out[0]:
            k = np.concatenate([o["khat"] for o in seeds_out])
            finite = k[np.isfinite(k)]
            row["khat_mean"] = float(finite.mean()) if finite.size else None
            row["khat_frac_good"] = float(np.mean(np.isfinite(k) & (k < diagnostics.KHAT_GOOD)))
            row["khat_frac_bad"] = float(np.mean(np.isfinite(k) & (k >= diagnostics.KHAT_BAD)))
            row["khat_frac_undetermined"] = float(np.mean(~np.isfinite(k)))
        else:
            row["global_khat"] = float(np.mean([o["global_khat"] for o in seeds_out]))
        rows.append(row)
    return rows


def _loo_comparison(config: CompareConfig, run_dir: Path) -> dict:
    """NUTS and VI (reparameterized, first seed) Bayesian GMMs for every K of ``compare_components``: az.compare."""
    cfg = config.bayesian_gmm
    x = _bayesian_gmm_data(cfg, config.compare.seed)
    nuts, vi, rows, nuts_main = {}, {}, [], None
    for K in cfg.compare_components:
        problem = _bayesian_gmm_problem(config, x, K, config.compare.seed)
        mcmc, samples, log_lik, wall = run_nuts_bayesian_gmm(
            problem, cfg.nuts_warmup, cfg.nuts_samples, config.compare.seed, cfg.nuts_max_tree_depth
        )
        ordered = canonical_order(samples)
        idata = diagnostics.from_pyro_mcmc(mcmc, log_likelihood={"x": log_lik[None]})
        for k, v in ordered.items():  # the canonical component order
            idata.posterior[k].values[...] = v[None]
        nuts[f"K={K}"] = idata
        diagnostics.save_netcdf(idata, run_dir / "idata" / f"bayesian-gmm__nuts__K{K}.nc")
        if K == cfg.num_components:
            nuts_main = (ordered, wall)
        problem = _bayesian_gmm_problem(config, x, K, config.compare.seed)
        tr = train_estimator(problem, "reparameterized", config, config.compare.seed)
        draws, vi_log_lik, khat, _ = bayesian_gmm_q_draws(problem, cfg.num_draws, config.compare.seed)
        vi[f"K={K}"] = diagnostics.draws_inference_data(
            {k: v[None] for k, v in canonical_order(draws).items()}, log_likelihood={"x": vi_log_lik[None]},
            dims={"x": ["datapoint"]}, attrs={"global_khat": khat})
        with warnings.catch_warnings():  # ArviZ warns about large Pareto k; the table reports the largest
            warnings.simplefilter("ignore", UserWarning)
            loo_n = diagnostics.loo(nuts[f"K={K}"], pointwise=True)
            loo_v = diagnostics.loo(vi[f"K={K}"], pointwise=True)
        rows.append({"K": K, "nuts_elpd_loo": float(loo_n.elpd_loo), "nuts_se": float(loo_n.se),
                     "nuts_khat_max": float(np.max(loo_n.pareto_k)), "nuts_wall_s": wall,
                     "vi_elpd_loo": float(loo_v.elpd_loo), "vi_se": float(loo_v.se),
                     "vi_khat_max": float(np.max(loo_v.pareto_k)), "vi_global_khat": khat,
                     "vi_final_elbo": tr.elbo[-1]})
        _log(config, f"[bayesian-gmm] K={K}: NUTS elpd_loo {rows[-1]['nuts_elpd_loo']:.2f} ({wall:.1f} s), "
                     f"VI elpd_loo {rows[-1]['vi_elpd_loo']:.2f}, VI global k̂ {khat:.2f}")
    tables = {}
    if len(cfg.compare_components) > 1:
        tables["nuts"] = diagnostics.compare(nuts)
        tables["vi"] = diagnostics.compare(vi)
    return {"rows": rows, "compare": tables, "nuts_main": nuts_main}


def run_comparison(config: CompareConfig, run_dir=None) -> dict:
    """Run every part of the comparison for ``[compare].problems`` and write the run directory::

        report.md            the tables below, with the settings
        gradients.csv        variance, SNR, |z| against the exact gradient, cost, per problem and estimator
        gradients_params.csv the same per parameter tensor
        training.csv         final ELBO over seeds, R-hat across seeds, log-likelihood and k̂ of the final q
        training_curves.csv  the ELBO every eval_every steps, per seed
        loo.csv, loo_compare_{nuts,vi}.csv   Bayesian GMMs with K = compare_components
        idata/*.nc           InferenceData per problem and estimator (chains = seeds), NUTS runs
        gradient_variance.png, elbo_curves.png, khat_hist.png, vi_vs_nuts.png
        summary.json

    :return: the summary (also in ``summary.json``).
    """
    run_dir = Path(run_dir or config.compare.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.compare.threads)
    started = time.perf_counter()
    try:
        return _run(config, run_dir, started)
    finally:
        torch.set_num_threads(previous_threads)


def _run(config: CompareConfig, run_dir: Path, started: float) -> dict:
    grad_rows, param_rows, train_rows, curve_rows = [], [], [], []
    grad_runs, train_results, nuts_refs = {}, {}, {}
    loo = None
    timings = {}
    for problem_name in config.compare.problems:
        t0 = time.perf_counter()
        runs = _gradient_comparison(problem_name, config)
        grad_runs[problem_name] = runs
        grad_rows += _gradient_rows(problem_name, config, runs)
        for name, item in runs.items():
            if isinstance(item, GradientStats):
                for p in sorted(item.mean):
                    z = item.z_scores(p)
                    sd = np.sqrt(item.var[p])
                    with np.errstate(divide="ignore", invalid="ignore"):
                        snr = np.where(sd > 0, np.abs(item.mean[p]) / sd, np.nan)
                    param_rows.append({
                        "problem": problem_name, "estimator": name, "param": p, "role": item.role[p],
                        "numel": item.mean[p].size, "mean_variance": float(item.var[p].mean()),
                        "mean_snr": float(np.nanmean(snr)) if np.isfinite(snr).any() else None,
                        "max_abs_z": float(np.nanmax(np.abs(z))) if z is not None else None,
                    })
        timings[f"{problem_name}_gradients_s"] = time.perf_counter() - t0
        if config.training.num_seeds == 0:
            continue
        t0 = time.perf_counter()
        trained = _training_comparison(problem_name, config, run_dir)
        results = trained["results"]
        train_results[problem_name] = results
        idatas = {}
        for name, seeds_out in results.items():
            if isinstance(seeds_out, str):
                continue
            idata = _inference_data(problem_name, name, seeds_out)
            idatas[name] = idata
            diagnostics.save_netcdf(idata, run_dir / "idata" / f"{problem_name}__{name}.nc")
            for o in seeds_out:
                for step, value in zip(o["train"].steps, o["train"].elbo):
                    curve_rows.append({"problem": problem_name, "estimator": name, "seed": o["train"].seed,
                                       "step": step, "elbo": value})
        train_rows += _training_rows(problem_name, results, idatas)
        timings[f"{problem_name}_training_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if problem_name == "bayesian-gmm":
            loo = _loo_comparison(config, run_dir)
            nuts_refs["bayesian-gmm"] = loo["nuts_main"]
            summaries = {}
            for name, idata in idatas.items():
                if "posterior" in idata.groups():
                    summaries[name] = diagnostics.summary(idata, var_names=["weights", "locs", "scales"])
            nuts_refs["bayesian-gmm-summaries"] = summaries
        elif problem_name == "linear-gaussian" and trained["reference_problem"] is not None:
            lgc = config.linear_gaussian
            ref = trained["reference_problem"]
            mcmc, z, wall = run_nuts_linear_gaussian(ref, lgc.nuts_datapoints, lgc.nuts_warmup, lgc.nuts_samples,
                                                     config.compare.seed, lgc.nuts_max_tree_depth)
            diagnostics.save_netcdf(diagnostics.from_pyro_mcmc(mcmc), run_dir / "idata" / "linear-gaussian__nuts.nc")
            nuts_refs["linear-gaussian"] = _linear_gaussian_reference(ref, z, wall, config)
        timings[f"{problem_name}_nuts_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - started
        # Tables after every problem (a long run shows its results as it goes); plots once at the end.
        _write_outputs(config, run_dir, grad_rows, param_rows, train_rows, curve_rows, train_results, loo,
                       nuts_refs, timings, plots=False)
    timings["total_s"] = time.perf_counter() - started
    return _write_outputs(config, run_dir, grad_rows, param_rows, train_rows, curve_rows, train_results, loo,
                          nuts_refs, timings, plots=config.compare.plots)


@torch.no_grad()
def _linear_gaussian_reference(problem: Problem, z_nuts: np.ndarray, wall: float, config: CompareConfig) -> dict:
    from ppl_models.linear_gaussian import exact_posterior

    n = z_nuts.shape[1]
    x = problem.dataset.tensors[0][:n]
    idx = torch.arange(n)
    params = problem.instance.modules["params"]
    z_loc, scale_tril = exact_posterior(params, x)
    with torch.random.fork_rng(devices=[]), poutine.block():
        torch.manual_seed(config.compare.seed)
        with pyro.plate("draws", z_nuts.shape[0], dim=-2):
            tr = poutine.trace(problem.instance.guide).get_trace(x, idx)
    z_vi = tr.nodes["z"]["value"].numpy()  # (S, n, d)
    exact_sd = scale_tril.pow(2).sum(-1).sqrt().numpy()
    rows = []
    for i in range(n):
        for d in range(z_nuts.shape[-1]):
            rows.append({"datapoint": i, "dim": d, "exact_mean": float(z_loc[i, d]), "exact_sd": float(exact_sd[d]),
                         "nuts_mean": float(z_nuts[:, i, d].mean()), "nuts_sd": float(z_nuts[:, i, d].std()),
                         "vi_mean": float(z_vi[:, i, d].mean()), "vi_sd": float(z_vi[:, i, d].std())})
    return {"rows": rows, "z_nuts": z_nuts, "z_vi": z_vi, "exact_loc": z_loc.numpy(), "exact_tril": scale_tril.numpy(),
            "wall_s": wall}


def _write_outputs(config, run_dir, grad_rows, param_rows, train_rows, curve_rows, train_results, loo, nuts_refs,
                   timings, plots: bool) -> dict:
    _write_csv(run_dir / "gradients.csv", grad_rows, GRADIENT_COLUMNS)
    _write_csv(run_dir / "gradients_params.csv", param_rows,
               ["problem", "estimator", "param", "role", "numel", "mean_variance", "mean_snr", "max_abs_z"])
    _write_csv(run_dir / "training.csv", train_rows, TRAINING_COLUMNS)
    _write_csv(run_dir / "training_curves.csv", curve_rows, ["problem", "estimator", "seed", "step", "elbo"])
    g, t = config.gradients, config.training
    training_part = [
        f"## Training ({t.num_seeds} seeds x {t.num_steps} steps, batch {t.batch_size}; ELBO per datapoint on a fixed "
        f"evaluation set, {t.eval_particles} draws or exact)\n",
        "elbo_rhat: R-hat of the second half of the ELBO traces with the seeds as chains; k̂: PSIS k̂ of the final "
        f"q per datapoint ({t.num_samples} importance samples; < {diagnostics.KHAT_GOOD} good, >= "
        f"{diagnostics.KHAT_BAD} unreliable; undetermined: no tail to fit, e.g. a Categorical q whose few distinct "
        "weights leave PSIS nothing to smooth); global k̂: of q over the Bayesian GMM's global latents.\n",
        _md_table(train_rows, ["problem", "estimator", "status", "final_elbo_mean", "final_elbo_sd", "elbo_rhat",
                               "log_lik_mean", "khat_mean", "khat_frac_good", "khat_frac_bad",
                               "khat_frac_undetermined", "global_khat", "wall_s_per_run"]),
    ] if train_rows else []
    parts = [
        "# Gradient estimators compared\n",
        f"Settings: {json.dumps(config.to_dict())}\n",
        f"Torch threads: {config.compare.threads}; total wall time {timings['total_s']:.1f} s.\n",
        f"## Gradients at fixed parameters ({g.num_draws} one-draw gradients of -ELBO on a fixed batch of "
        f"{g.batch_size}, after {g.pretrain_steps} Adam steps)\n",
        "Variance and SNR (|mean| / sd) are per parameter element, averaged over the guide's (or the model's) "
        "parameters; max |z|: the largest z-score of the mean against the exact gradient (none where it is not "
        "computable or the target is not the ELBO); cpu_ms_per_gradient: CPU time of one gradient.\n",
        _md_table(grad_rows, ["problem", "estimator", "status", "guide_mean_variance",
                              "variance_ratio_to_reparameterized", "guide_mean_snr", "guide_max_abs_z",
                              "model_mean_variance", "model_max_abs_z", "cpu_ms_per_gradient"]),
        *training_part,
    ]
    summary = {"timings_s": timings, "gradients": grad_rows, "training": train_rows}
    if loo is not None:
        _write_csv(run_dir / "loo.csv", loo["rows"], list(loo["rows"][0]))
        parts += ["## Bayesian GMMs: PSIS-LOO across K (NUTS, and VI with the reparameterized estimator)\n",
                  "VI pointwise log-likelihood: importance sampling over the global latents' guide, resampled by "
                  "the Pareto-smoothed weights (see ppl_models/compare/).\n",
                  _md_table(loo["rows"], list(loo["rows"][0]))]
        for kind, table in loo["compare"].items():
            text = table.to_csv()
            atomic_write_bytes(run_dir / f"loo_compare_{kind}.csv", lambda f, s=text: f.write(s.encode()))
            parts += [f"\naz.compare ({kind}):\n\n```\n{table.to_string()}\n```\n"]
        summary["loo"] = loo["rows"]
    sums = nuts_refs.get("bayesian-gmm-summaries") or {}
    for name, table in sums.items():
        parts += [f"\naz.summary of the Bayesian GMM's q, {name} (chains = seeds):\n\n```\n{table.to_string()}\n```\n"]
    if "linear-gaussian" in nuts_refs:
        ref = nuts_refs["linear-gaussian"]
        parts += ["## Linear-Gaussian: posterior of z for the first datapoints — exact, NUTS, VI (reparameterized)\n",
                  f"NUTS wall time {ref['wall_s']:.1f} s.\n",
                  _md_table(ref["rows"], list(ref["rows"][0]))]
    text = "\n".join(parts)
    atomic_write_bytes(run_dir / "report.md", lambda f: f.write(text.encode()))
    if plots:
        plot_all(run_dir, grad_rows, train_results, nuts_refs)
    summary_text = json.dumps(summary, indent=1, default=_json_default, allow_nan=True)
    atomic_write_bytes(run_dir / "summary.json", lambda f: f.write(summary_text.encode()))
    return summary


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


def plot_all(run_dir: Path, grad_rows: List[dict], train_results: dict, nuts_refs: dict) -> List[Path]:
    """gradient_variance.png, elbo_curves.png, khat_hist.png and (with a NUTS reference) vi_vs_nuts.png."""
    written = [plot_gradient_variance(grad_rows, run_dir / "gradient_variance.png")]
    if train_results:
        written += [plot_elbo_bands(train_results, run_dir / "elbo_curves.png"),
                    plot_khat_hist(train_results, run_dir / "khat_hist.png")]
    if "bayesian-gmm" in nuts_refs or "linear-gaussian" in nuts_refs:
        written.append(plot_vi_vs_nuts(train_results, nuts_refs, run_dir / "vi_vs_nuts.png"))
    return [w for w in written if w is not None]


def _plt():
    from ppl_models.tasks.plots import plt, save_figure  # the Agg backend is selected there

    return plt, save_figure


def plot_gradient_variance(grad_rows: List[dict], path: Path) -> Path:
    """Mean variance per guide parameter element of each estimator, one panel per problem, log scale."""
    plt, save_figure = _plt()
    problems = list(dict.fromkeys(r["problem"] for r in grad_rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(4.2 * len(problems), 3.8), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        rows = [r for r in grad_rows if r["problem"] == problem]
        names = [r["estimator"] for r in rows]
        values = [r.get("guide_mean_variance") or np.nan for r in rows]
        colors = ["tab:red" if n.startswith("score") else "tab:blue" for n in names]
        ax.bar(range(len(rows)), values, color=colors)
        for i, (r, v) in enumerate(zip(rows, values)):
            if not np.isfinite(v):
                ax.text(i, 0.02, "n/a", ha="center", va="bottom", rotation=90, fontsize=7,
                        transform=ax.get_xaxis_transform())
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_title(problem, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("gradient variance per guide parameter")
    fig.suptitle("gradient variance at fixed parameters (red: score-function; missing bars: n/a)", fontsize=9)
    return save_figure(fig, path)


def plot_elbo_bands(train_results: dict, path: Path) -> Path:
    """ELBO per datapoint against steps: the mean over seeds and a band from the lowest to the highest seed."""
    plt, save_figure = _plt()
    problems = list(train_results)
    fig, axes = plt.subplots(1, len(problems), figsize=(4.6 * len(problems), 3.8), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        lows = []
        for name, seeds_out in train_results[problem].items():
            if isinstance(seeds_out, str):
                continue
            steps = np.asarray(seeds_out[0]["train"].steps)
            traces = np.stack([np.asarray(o["train"].elbo) for o in seeds_out])
            (line,) = ax.plot(steps, traces.mean(0), label=f"{name} ({len(seeds_out)} seeds)", lw=1.2)
            ax.fill_between(steps, traces.min(0), traces.max(0), color=line.get_color(), alpha=0.2)
            lows.append(np.percentile(traces[:, len(steps) // 4:], 5))
            hi = traces.max()
        if lows:
            lo = min(lows)
            ax.set_ylim(lo - 0.05 * abs(hi - lo + 1e-9), hi + 0.05 * abs(hi - lo + 1e-9))
        ax.set_title(problem, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    axes[0][0].set_ylabel("ELBO per datapoint (nats)")
    return save_figure(fig, path)


def plot_khat_hist(train_results: dict, path: Path) -> Optional[Path]:
    """Per-datapoint PSIS k̂ of the final q (all seeds), per problem with local latents, per estimator."""
    plt, save_figure = _plt()
    problems = [p for p, res in train_results.items()
                if any(not isinstance(v, str) and "khat" in v[0] for v in res.values())]
    if not problems:
        return None
    fig, axes = plt.subplots(1, len(problems), figsize=(4.4 * len(problems), 3.6), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        for name, seeds_out in train_results[problem].items():
            if isinstance(seeds_out, str):
                continue
            k = np.concatenate([o["khat"] for o in seeds_out])
            k = k[np.isfinite(k)]
            if k.size:
                ax.hist(np.clip(k, -0.5, 2.0), bins=40, range=(-0.5, 2.0), histtype="step", label=name)
        for v, style in ((diagnostics.KHAT_GOOD, ":"), (diagnostics.KHAT_BAD, "--")):
            ax.axvline(v, color="k", ls=style, lw=0.8)
        ax.set_title(f"{problem}: PSIS k̂ per datapoint", fontsize=9)
        ax.set_xlabel("k̂ (clipped to [-0.5, 2])")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return save_figure(fig, path)


def plot_vi_vs_nuts(train_results: dict, nuts_refs: dict, path: Path) -> Path:
    """Bayesian GMM: component locations drawn by NUTS and by each estimator's q (first seed); linear-Gaussian:
    z of the first datapoint — NUTS, VI and the exact posterior's 1- and 2-sd ellipses."""
    plt, save_figure = _plt()
    panels = [k for k in ("bayesian-gmm", "linear-gaussian") if k in nuts_refs and nuts_refs[k] is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "bayesian-gmm":
            ordered, _ = nuts_refs[key]
            locs = ordered["locs"].reshape(-1, ordered["locs"].shape[-1])
            ax.scatter(locs[:, 0], locs[:, 1], s=4, c="k", alpha=0.3, label="NUTS")
            for name, seeds_out in train_results.get("bayesian-gmm", {}).items():
                if isinstance(seeds_out, str):
                    continue
                q = seeds_out[0]["draws"]["locs"].reshape(-1, locs.shape[-1])
                ax.scatter(q[:, 0], q[:, 1], s=3, alpha=0.3, label=f"VI {name}")
            ax.set_title("Bayesian GMM: component locations", fontsize=9)
        else:
            ref = nuts_refs[key]
            zn, zv = ref["z_nuts"][:, 0], ref["z_vi"][:, 0]
            ax.scatter(zn[:, 0], zn[:, 1], s=4, c="k", alpha=0.3, label="NUTS")
            ax.scatter(zv[:, 0], zv[:, 1], s=4, alpha=0.3, label="VI (reparameterized, mean-field)")
            theta = np.linspace(0, 2 * np.pi, 200)
            circle = np.stack([np.cos(theta), np.sin(theta)])
            for r in (1, 2):
                e = ref["exact_loc"][0][:, None] + r * ref["exact_tril"][:2, :2] @ circle
                ax.plot(e[0], e[1], "r-", lw=0.8, label="exact posterior (1, 2 sd)" if r == 1 else None)
            ax.set_title("linear-Gaussian: z of datapoint 0", fontsize=9)
        ax.legend(fontsize=6, markerscale=3)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
