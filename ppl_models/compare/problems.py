r"""The comparison's problems: a model, its guide and data each, ready for the gradient statistics and training.

* ``vae`` — the MNIST VAE (:mod:`ppl_models.vae`) with its amortized encoder, on binarized MNIST
  (``[vae] data = "mnist"``) or on data simulated from a random decoder (``"simulated"``);
* ``gmm`` — the Gaussian mixture (:mod:`ppl_models.gmm`) with the per-datapoint Categorical guide: ``z`` is
  discrete, so only score-function estimators apply;
* ``linear-gaussian`` — the conjugate model (:mod:`ppl_models.linear_gaussian`) with the per-datapoint Gaussian
  guide: the exact ELBO (:func:`linear_gaussian_exact_elbo`) and so its gradient are known in closed form;
* ``bayesian-gmm`` — the Bayesian mixture (:mod:`ppl_models.bayesian_gmm`) with ``z`` summed out and the
  mean-field guide over the global latents (:mod:`ppl_models.guides.bayesian_gmm`);
* ``experiment`` — the model, guide and data of any ``ppl-models fit`` config.

The data are fixed by ``[compare].seed`` (the same for every estimator and seed); the model's and guide's
initialisation by the seed passed to :func:`build_problem`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn

from ppl_models import registry
from ppl_models.app.config import ConfigError
from ppl_models.compare.config import PROBLEMS, BayesianGMMSection, CompareConfig, VAESection
from ppl_models.data import TensorDataset
from ppl_models.registry import UnknownNameError

__all__ = [
    "Problem",
    "build_problem",
    "bayesian_gmm_data",
    "bayesian_gmm_problem",
    "linear_gaussian_exact_elbo",
    "enumerated_exact_elbo",
]

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


#: Keywords of every call on a batch with its indices: the batch's own ELBO, not scaled by N / |idx| (the bound model
#: and guide of :func:`ppl_models.registry.instantiate` scale a batch given with ``idx`` by default).
UNSCALED = {"num_data": None}


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

        return Problem(name, inst, TensorDataset(x), (x[idx], idx), UNSCALED, (x[ev], ev), exact, _guide_module_names(inst),
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

        return Problem(name, inst, TensorDataset(x), (x[idx], idx), UNSCALED, (x[ev], ev), exact, _guide_module_names(inst),
                       lr=0.02, info={"num_data": cfg.num_data})
    cfg = config.bayesian_gmm  # bayesian-gmm
    x = bayesian_gmm_data(cfg, data_seed)
    return bayesian_gmm_problem(config, x, cfg.num_components, seed)


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
    return Problem("experiment", instance, TensorDataset(x), (x[idx], idx), UNSCALED, (x[ev], ev), None,
                   _guide_module_names(instance),
                   info={"config": str(path), "model": instance.model_name, "guide": instance.guide_name,
                         "num_data": N})


def bayesian_gmm_data(cfg: BayesianGMMSection, data_seed: int) -> torch.Tensor:
    """The Bayesian GMM's data: ``(num_data, data_dim)`` from a mixture of ``true_components`` (``data_seed``)."""
    from ppl_models import gmm

    truth = _true_gmm(cfg.true_components, cfg.data_dim, cfg.separation, data_seed)
    x, _ = gmm.simulate(truth, cfg.num_data, torch.Generator().manual_seed(data_seed))
    return x


def bayesian_gmm_problem(config: CompareConfig, x: torch.Tensor, K: int, seed: int) -> Problem:
    """The Bayesian GMM with ``K`` components on data ``x`` ``(N, D)`` and the guide ``"mean-field-globals"``, its
    location means started at k-means++ seeds of ``x`` drawn with ``seed``."""
    from ppl_models import gmm

    cfg = config.bayesian_gmm
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    start = gmm.GMMParams(K, cfg.data_dim).init_from_data(x, torch.Generator().manual_seed(seed))
    inst = registry.instantiate("bayesian-gmm", "mean-field-globals", num_data=x.shape[0],
                                model_kwargs={"num_components": K, "data_dim": cfg.data_dim, "loc_scale": 10.0},
                                guide_kwargs={"init_locs": start.locs, "init_log_scales": start.log_scales.detach()})
    return Problem("bayesian-gmm", inst, TensorDataset(x), (x, None), {}, (x, None), None, ("q_globals",),
                   local=False, enumerated=True, lr=cfg.lr,
                   info={"num_data": x.shape[0], "K": K, "init_locs": start.locs.detach().clone()})
