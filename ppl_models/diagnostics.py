"""The package's one adapter to ArviZ: Pareto k̂, InferenceData in and out, and thin wrappers.

This is the only module that imports :mod:`arviz`, so a move to ArviZ 1.x touches this file alone.

* :func:`psis_khat` — Pareto-smoothed importance sampling shape :math:`\\hat k` per row of log weights
  (Vehtari et al. 2024): :math:`\\hat k < 0.5` the importance sampling estimate is reliable,
  :math:`0.5 \\le \\hat k < 0.7` usable, :math:`\\hat k \\ge 0.7` unreliable (the proposal's tails are too light).
* :func:`pointwise_inference_data`, :func:`save_netcdf`, :func:`load_netcdf` — per-datapoint results as an
  :class:`arviz.InferenceData` written to netCDF atomically.
* :func:`summary`, :func:`ess`, :func:`rhat`, :func:`loo` — pass-throughs to ArviZ.
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
]

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
