"""The package's one adapter to ArviZ: Pareto k̂, InferenceData in and out, and thin wrappers.

This is the only module that imports :mod:`arviz`, so a move to ArviZ 1.x touches this file alone.

* :func:`psis_khat` — Pareto-smoothed importance sampling shape :math:`\\hat k` per row of log weights
  (Vehtari et al. 2024): :math:`\\hat k < 0.5` the importance sampling estimate is reliable,
  :math:`0.5 \\le \\hat k < 0.7` usable, :math:`\\hat k \\ge 0.7` unreliable (the proposal's tails are too light).
* :func:`pointwise_inference_data`, :func:`save_netcdf`, :func:`load_netcdf` — per-datapoint results as an
  :class:`arviz.InferenceData` written to netCDF atomically.
* :func:`summary`, :func:`ess`, :func:`rhat`, :func:`loo` — pass-throughs to ArviZ.
* :func:`draws_inference_data`, :func:`from_pyro_mcmc`, :func:`add_log_likelihood`, :func:`compare` — the
  estimator comparison (:mod:`ppl_models.compare`): draws with chains (seeds or MCMC chains), ELBO traces,
  pointwise log-likelihoods, ``az.from_pyro`` for Pyro's MCMC and ``az.compare``.
"""

from __future__ import annotations

import os
import warnings
from typing import Mapping

import numpy as np

from ppl_models.atomic import atomic_path

# ArviZ 0.2x prints this FutureWarning (at most once a day) on import; filter it by its text only.
warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning)
import arviz as az  # noqa: E402

__all__ = [
    "KHAT_GOOD",
    "KHAT_BAD",
    "psis_khat",
    "pointwise_inference_data",
    "save_netcdf",
    "load_netcdf",
    "summary",
    "ess",
    "rhat",
    "loo",
    "draws_inference_data",
    "from_pyro_mcmc",
    "add_log_likelihood",
    "compare",
    "psis_smooth",
    "InferenceData",
]

InferenceData = az.InferenceData

#: :math:`\hat k` below this: importance sampling with these weights is reliable.
KHAT_GOOD = 0.5
#: :math:`\hat k` at or above this: the estimate is unreliable.
KHAT_BAD = 0.7

#: Rows of log weights handed to ``az.psislw`` at once (it copies its input and returns smoothed weights
#: of the same size, so the working set is about three times the chunk).
_PSIS_CHUNK_BYTES = 32 * 2**20


def psis_khat(log_weights: np.ndarray, samples_axis: int = -1) -> np.ndarray:
    r"""Pareto :math:`\hat k` of each set of importance log weights, via ``az.psislw`` with ``reff=1``.

    :param log_weights: log importance weights :math:`\log p(x, z_s) - \log q(z_s)`, any shape;
        the samples :math:`s` lie along ``samples_axis``.  Float32 is kept as is (no float64 copy of
        the whole array); rows are processed a chunk at a time.
    :param samples_axis: the axis of the samples.
    :return: :math:`\hat k` with ``samples_axis`` removed, float64.

    When all the weights of a row are exactly equal (the proposal is the exact posterior) ``az.psislw``
    finds no right tail to fit and returns :math:`\hat k = +\infty`; weights that are equal up to
    rounding give a fit to the rounding noise.  Neither is a sign of a bad proposal: judge the spread
    of the weights first.  Rows holding NaN give NaN; ``-inf`` weights are allowed.
    """
    lw = np.asarray(log_weights)
    if lw.ndim == 0:
        raise ValueError("psis_khat: log_weights must have a samples axis, received a scalar")
    lw = np.moveaxis(lw, samples_axis, -1)
    num_samples = lw.shape[-1]
    if num_samples < 2:
        raise ValueError(f"psis_khat: expected at least 2 samples along axis {samples_axis}, received {num_samples}")
    batch_shape = lw.shape[:-1]
    rows = lw.reshape(-1, num_samples)
    khat = np.empty(rows.shape[0], dtype=np.float64)
    step = max(1, _PSIS_CHUNK_BYTES // (num_samples * rows.itemsize))
    for start in range(0, rows.shape[0], step):
        chunk = np.array(rows[start : start + step])  # psislw copies anyway; a contiguous block
        bad = ~np.isfinite(chunk).any(axis=-1) | np.isnan(chunk).any(axis=-1) | np.isposinf(chunk).any(axis=-1)
        if bad.any():
            chunk[bad] = 0.0
        with warnings.catch_warnings():
            # psislw warns once per call about large k; the caller reads the values.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            _, k = az.psislw(chunk, reff=1.0)
        k = np.asarray(k, dtype=np.float64)
        k[bad] = np.nan
        khat[start : start + step] = k
    return khat.reshape(batch_shape)


def _with_chain_draw(name: str, values, n: int | None) -> np.ndarray:
    """``(n,)`` -> ``(1, 1, n)``, ``(draws, n)`` -> ``(1, draws, n)``, ``(chains, draws, n)`` as is."""
    a = np.asarray(values)
    if a.ndim == 1:
        a = a[None, None, :]
    elif a.ndim == 2:
        a = a[None]
    elif a.ndim != 3:
        raise ValueError(f"{name}: expected shape (n,), (draws, n) or (chains, draws, n), received {a.shape}")
    if n is not None and a.shape[-1] != n:
        raise ValueError(f"{name}: expected {n} datapoints on the last axis, received shape {a.shape}")
    return a


def pointwise_inference_data(
    log_lik,
    observed_name: str,
    *,
    extra: Mapping[str, np.ndarray] | None = None,
    dim_name: str = "datapoint",
    attrs: Mapping | None = None,
) -> az.InferenceData:
    """Per-datapoint results as an :class:`arviz.InferenceData`.

    :param log_lik: pointwise log-likelihood, shape ``(n,)`` (one estimate per datapoint, stored with
        ``chain`` and ``draw`` of size 1), ``(draws, n)`` or ``(chains, draws, n)``.
    :param observed_name: the observed site's name; the variable's name in the ``log_likelihood`` group.
    :param extra: more per-datapoint arrays (``elbo``, ``kl``, ``pareto_khat``...), each of one of the
        shapes above with the same ``n``; stored in the ``sample_stats`` group.
    :param dim_name: name of the datapoint dimension.
    :param attrs: attributes of both groups (numbers and strings: netCDF attributes).
    """
    ll = _with_chain_draw(f"log_likelihood {observed_name!r}", log_lik, None)
    n = ll.shape[-1]
    stats = {name: _with_chain_draw(f"extra {name!r}", a, n) for name, a in (extra or {}).items()}
    dims = {observed_name: [dim_name], **{name: [dim_name] for name in stats}}
    coords = {dim_name: np.arange(n)}
    return az.from_dict(
        log_likelihood={observed_name: ll},
        sample_stats=stats or None,
        coords=coords,
        dims=dims,
        log_likelihood_attrs=dict(attrs or {}),
        sample_stats_attrs=dict(attrs or {}) if stats else None,
    )


def save_netcdf(idata: az.InferenceData, path) -> str:
    """Write ``idata`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``.

    :return: ``path`` as a string.
    """
    with atomic_path(path) as tmp:
        idata.to_netcdf(tmp)
    return os.fspath(path)


def load_netcdf(path) -> az.InferenceData:
    """Read an InferenceData written by :func:`save_netcdf`, loaded into memory (the file is closed)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"netCDF file {path!r}: expected an existing file, found none")
    with az.rc_context({"data.load": "eager"}):
        return az.from_netcdf(path)


def summary(data, **kwargs):
    """``az.summary``: posterior means, sds, ESS and R-hat as a table."""
    return az.summary(data, **kwargs)


def ess(data, **kwargs):
    """``az.ess``: effective sample size."""
    return az.ess(data, **kwargs)


def rhat(data, **kwargs):
    """``az.rhat``: the rank-normalized split R-hat."""
    return az.rhat(data, **kwargs)


def loo(data, **kwargs):
    """``az.loo``: PSIS leave-one-out cross-validation."""
    return az.loo(data, **kwargs)


def draws_inference_data(
    posterior: Mapping[str, np.ndarray] | None = None,
    *,
    sample_stats: Mapping[str, np.ndarray] | None = None,
    log_likelihood: Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, list] | None = None,
    coords: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping | None = None,
) -> az.InferenceData:
    """An :class:`arviz.InferenceData` from arrays shaped ``(chain, draw, ...)`` (``az.from_dict``).

    :param posterior: draws of latent variables, e.g. ``{"locs": (seeds, draws, K, D)}``.
    :param sample_stats: e.g. ELBO traces ``{"elbo": (seeds, evaluations)}`` (a group's ``draw`` length is its own).
    :param log_likelihood: pointwise log-likelihoods ``{"x": (chains, draws, n)}``.
    :param dims: dimension names after ``(chain, draw)`` per variable.
    :param coords: coordinates of those dimensions.
    :param attrs: attributes of every group (numbers and strings).
    """
    for group, values in (("posterior", posterior), ("sample_stats", sample_stats), ("log_likelihood", log_likelihood)):
        for name, a in (values or {}).items():
            if np.asarray(a).ndim < 2:
                raise ValueError(f"{group} {name!r}: expected shape (chain, draw, ...), received {np.shape(a)}")
    with warnings.catch_warnings():
        # (seeds, 1, ...) arrays are intended: one value per seed (e.g. a per-datapoint k̂ of the final q).
        warnings.filterwarnings("ignore", message=r"More chains \(\d+\) than draws", category=UserWarning)
        return _from_dict_draws(posterior, sample_stats, log_likelihood, dims, coords, attrs)


def _from_dict_draws(posterior, sample_stats, log_likelihood, dims, coords, attrs):
    return az.from_dict(
        posterior=dict(posterior) if posterior else None,
        sample_stats=dict(sample_stats) if sample_stats else None,
        log_likelihood=dict(log_likelihood) if log_likelihood else None,
        dims=dict(dims or {}),
        coords=dict(coords or {}),
        posterior_attrs=dict(attrs or {}) if posterior else None,
        sample_stats_attrs=dict(attrs or {}) if sample_stats else None,
        log_likelihood_attrs=dict(attrs or {}) if log_likelihood else None,
    )


def from_pyro_mcmc(mcmc, *, log_likelihood: Mapping[str, np.ndarray] | None = None, dims=None, coords=None):
    """``az.from_pyro`` of a finished :class:`pyro.infer.MCMC` run (posterior and NUTS sample stats).

    ArviZ's own log-likelihood pass re-runs the model on every draw, which fails for models that enumerate a
    site; ``log_likelihood`` (``{"x": (chains, draws, n)}``, computed by the caller) is added instead.
    """
    idata = az.from_pyro(mcmc, log_likelihood=False, dims=dims, coords=coords)
    if log_likelihood:
        add_log_likelihood(idata, log_likelihood)
    return idata


def add_log_likelihood(idata: az.InferenceData, log_likelihood: Mapping[str, np.ndarray], dim_name: str = "datapoint"):
    """Add (or replace) the ``log_likelihood`` group: ``{"x": (chains, draws, n)}``."""
    groups = {}
    for name, a in log_likelihood.items():
        a = np.asarray(a)
        if a.ndim != 3:
            raise ValueError(f"log_likelihood {name!r}: expected shape (chains, draws, n), received {a.shape}")
        groups[name] = a
    extra = az.from_dict(
        log_likelihood=groups, dims={k: [dim_name] for k in groups}, coords={dim_name: np.arange(a.shape[-1])}
    )
    if "log_likelihood" in idata.groups():
        del idata.log_likelihood
    idata.add_groups(log_likelihood=extra.log_likelihood)
    return idata


def compare(models: Mapping[str, az.InferenceData], **kwargs):
    """``az.compare`` (PSIS-LOO by default): a table ranking the models by expected log predictive density."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # high Pareto k warnings: the table reports them
        warnings.filterwarnings("ignore", message=r"The inplace keyword")  # inside ArviZ, with pandas >= 3
        return az.compare(dict(models), **kwargs)


def psis_smooth(log_weights) -> tuple:
    """Pareto-smoothed, normalized log importance weights of one set of draws (``az.psislw``, ``reff=1``) and
    their :math:`\\hat k`.

    :param log_weights: shape ``(S,)``.
    :return: ``(smoothed log weights (S,) with logsumexp 0, k̂)``.
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.ndim != 1 or lw.shape[0] < 2:
        raise ValueError(f"psis_smooth: expected log weights of shape (S,) with S >= 2, received {lw.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        smoothed, k = az.psislw(lw.copy(), reff=1.0)
    return np.asarray(smoothed, dtype=np.float64), float(k)
