r"""References for the final q: pointwise log-likelihoods, PSIS k̂, draws of the global latents, NUTS runs, and
the training results as ArviZ InferenceData (through :mod:`ppl_models.infer.diagnostics`, the only module that
imports ArviZ).

**How the pointwise log-likelihood of a VI fit is obtained.**  Local latents (VAE, GMM, linear-Gaussian): the
IWAE estimate :math:`\log \frac1S \sum_s p(x_i, z_s)/q(z_s \mid x_i)` with :math:`S` = ``num_samples`` draws of
the final guide (:func:`ppl_models.infer.evaluate.log_weights`), its k̂ per datapoint (:func:`local_pointwise`).
Global latents (Bayesian GMM, :func:`bayesian_gmm_q_draws`): importance sampling over the global latents' guide
— draws :math:`\theta_s \sim q(\theta)`, weights :math:`p(x, \theta_s)/q(\theta_s)` Pareto-smoothed (their k̂
is Yao et al.'s diagnostic of the whole fit), then resampled in proportion to the smoothed weights
(sampling-importance-resampling) to give approximate posterior draws whose
:math:`\log p(x_i \mid \theta_s) = \log \sum_k \pi_k \mathcal{N}(x_i; \mu_k, \sigma_k)` is the pointwise
log-likelihood handed to ``az.loo``/``az.compare``.

Mixture components are exchangeable; draws are put in a canonical order (:func:`canonical_order`, by the first
coordinate of the locations) before any summary, so R-hat measures disagreement between seeds, not label
switching.

:func:`inference_data`: one InferenceData per problem and estimator.  With global latents (Bayesian GMM) the
seeds are the chains of a ``posterior`` (each seed's resampled draws of q, ``component`` and ``data_dim``
dimensions) with the pointwise ``log_likelihood`` of those draws and ``observed_data`` (``az.loo`` reads them).
With local latents there are no posterior draws to store: the IWAE estimate and k̂ per ``seed`` and ``datapoint``
go to the ``vi_evaluation`` group, which ArviZ's statistics do not read.  Both have the ELBO curves per ``seed``
and ``step`` in ``vi_training``.  The NUTS references (:func:`nuts_inference_data`) name every dimension after the
model's sizes (``component``, ``data_dim``, ``z_dim``, ``x_dim``) and share ``datapoint`` between
``observed_data`` and ``log_likelihood``.

References:
    Yao, Vehtari, Simpson & Gelman (2018), Yes, but Did It Work?: Evaluating Variational Inference.
    Vehtari, Gelman & Gabry (2017), Practical Bayesian model evaluation using leave-one-out cross-validation.
    Hoffman & Gelman (2014), The No-U-Turn Sampler.
"""

from __future__ import annotations

import math
import time
from typing import Dict

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from ppl_models.compare.config import CompareConfig
from ppl_models.compare.problems import Problem
from ppl_models.infer import diagnostics

__all__ = [
    "local_pointwise",
    "canonical_order",
    "mixture_pointwise_log_lik",
    "bayesian_gmm_q_draws",
    "run_nuts_bayesian_gmm",
    "run_nuts_linear_gaussian",
    "linear_gaussian_reference",
    "pointwise_log_lik",
    "inference_data",
    "nuts_inference_data",
]

#: Dimension names of the sites of the models with a NUTS reference (after ``chain``, ``draw``).
SITE_DIMS = {
    "bayesian-gmm": {"weights": ["component"], "locs": ["component", "data_dim"],
                     "scales": ["component", "data_dim"], "x": [diagnostics.DATAPOINT_DIM, "data_dim"]},
    "linear-gaussian": {"z": [diagnostics.DATAPOINT_DIM, "z_dim"], "x": [diagnostics.DATAPOINT_DIM, "x_dim"]},
}


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
    """Draws :math:`\\theta_s \\sim q` of the global latents and, by sampling-importance-resampling with their
    Pareto-smoothed weights :math:`p(x, \\theta_s)/q(\\theta_s)`, approximate posterior draws and their pointwise
    log-likelihood (see the module docstring).

    :return: a dict: ``q_draws`` (q's own draws), ``draws`` (the resampled ones) — each ``weights`` ``(S, K)``,
        ``locs`` and ``scales`` ``(S, K, D)`` — ``log_lik`` ``(S, n)`` of the resampled draws, ``global_khat``
        (PSIS k̂ of the weights) and ``log_weights`` ``(S,)``, with ``S = num_draws``.
    """
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
    return {"q_draws": {k: v.numpy() for k, v in d.items()}, "draws": {k: v[pick].numpy() for k, v in d.items()},
            "log_lik": log_lik[pick].double().numpy(), "global_khat": khat, "log_weights": lw_np}


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


@torch.no_grad()
def linear_gaussian_reference(problem: Problem, z_nuts: np.ndarray, wall: float, config: CompareConfig) -> dict:
    """The posterior of ``z`` for the first datapoints — exact (:func:`ppl_models.linear_gaussian.exact_posterior`),
    NUTS (``z_nuts`` ``(S, n, z_dim)``, ``wall`` seconds) and the problem's guide (``S`` draws) — as table rows
    (mean and sd per datapoint and dimension) and arrays for the plot."""
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


@torch.no_grad()
def pointwise_log_lik(model, samples: Dict[str, torch.Tensor], args: tuple, observed: str = "x",
                      max_plate_nesting: int = 1) -> np.ndarray:
    r""":math:`\log p(x_i \mid \theta_s)` of every draw ``s`` and datapoint ``i``: the model traced once with its
    latents conditioned on all the draws (a ``draws`` plate left of the model's plates), the observed site's
    ``log_prob``.

    :param samples: draws per latent site, each of shape ``(S,) + site shape`` (e.g. ``z``: ``(S, n, z_dim)``).
    :param args: the model's arguments (the data).
    :param max_plate_nesting: the model's plates (the ``draws`` plate goes left of them).
    :return: ``(S, n)``, float64.
    """
    S = next(iter(samples.values())).shape[0]
    with poutine.block(), pyro.plate("draws", S, dim=-(max_plate_nesting + 1)):
        tr = poutine.trace(poutine.condition(model, data=samples)).get_trace(*args)
    site = tr.nodes[observed]
    return site["fn"].log_prob(site["value"]).double().numpy()


def inference_data(problem_name: str, name: str, seeds_out: list, observed: Dict[str, np.ndarray] | None = None):
    """One InferenceData of estimator ``name`` on a problem (see the module docstring).

    :param seeds_out: per seed a dict with ``train`` (a :class:`~ppl_models.compare.training.TrainResult`),
        ``log_lik`` (``(n,)`` local latents, ``(S, n)`` global ones) and ``khat`` ``(n,)`` (local latents) or
        ``draws`` (``weights`` ``(S, K)``, ``locs`` and ``scales`` ``(S, K, D)``: the resampled draws whose
        pointwise log-likelihood ``log_lik`` is) and ``global_khat`` (global ones).
    :param observed: the data whose pointwise log-likelihood ``log_lik`` is, ``{"x": (n, D)}`` (global latents).
    """
    seeds = np.asarray([o["train"].seed for o in seeds_out])
    vi_training = {"elbo": np.stack([np.asarray(o["train"].elbo) for o in seeds_out])}  # (seed, step)
    dims = {"elbo": ["seed", "step"]}
    coords = {"seed": seeds, "step": np.asarray(seeds_out[0]["train"].steps)}
    attrs = {"problem": problem_name, "estimator": name}
    if "khat" in seeds_out[0]:
        vi_evaluation = {"log_likelihood": np.stack([o["log_lik"] for o in seeds_out]),
                         "pareto_khat": np.stack([o["khat"] for o in seeds_out])}
        dims.update({k: ["seed", diagnostics.DATAPOINT_DIM] for k in vi_evaluation})
        return diagnostics.build_inference_data(
            vi_evaluation=vi_evaluation, vi_training=vi_training, dims=dims, coords=coords, attrs=attrs,
            descriptions={"log_likelihood": "IWAE estimate of log p(x_i) under each seed's final q",
                          "pareto_khat": "PSIS k-hat of the importance weights per datapoint",
                          "elbo": "ELBO per datapoint on the fixed evaluation set"})
    posterior = {k: np.stack([o["draws"][k] for o in seeds_out]) for k in ("weights", "locs", "scales")}
    dims.update(SITE_DIMS["bayesian-gmm"], global_pareto_khat=["seed"])
    coords["chain"] = seeds
    attrs["chains"] = "seeds (each seed's q, draws resampled by their Pareto-smoothed importance weights)"
    return diagnostics.build_inference_data(
        posterior=posterior, log_likelihood={"x": np.stack([o["log_lik"] for o in seeds_out])},
        observed_data=observed, vi_evaluation={"global_pareto_khat": np.array([o["global_khat"] for o in seeds_out])},
        vi_training=vi_training, dims=dims, coords=coords, attrs=attrs,
        descriptions={"global_pareto_khat": "PSIS k-hat of q over the global latents (Yao et al. 2018)",
                      "elbo": "ELBO per datapoint on the fixed evaluation set"})


def nuts_inference_data(problem_name: str, mcmc, log_lik: np.ndarray, ordered: Dict[str, np.ndarray] | None = None):
    """The InferenceData of a NUTS reference: posterior, sample stats, observed data and the pointwise
    log-likelihood ``log_lik`` ``(draws, n)`` of the draws (one chain), dimensions named by :data:`SITE_DIMS`;
    ``ordered``: draws to put in place of the posterior's (the mixture components' canonical order)."""
    idata = diagnostics.from_pyro_mcmc(mcmc, log_likelihood={"x": log_lik[None]}, dims=SITE_DIMS[problem_name])
    for k, v in (ordered or {}).items():
        idata.posterior[k].values[...] = v[None]
    return idata
