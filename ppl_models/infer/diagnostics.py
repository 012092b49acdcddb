"""The package's one adapter to ArviZ: Pareto k̂, InferenceData in and out, and thin wrappers.

This is the only module that imports :mod:`arviz`, so a move to ArviZ 1.x touches this file alone.

* :func:`psis_khat` — Pareto-smoothed importance sampling shape :math:`\\hat k` per row of log weights
  (Vehtari et al. 2024): :math:`\\hat k < 0.5` the importance sampling estimate is reliable,
  :math:`0.5 \\le \\hat k < 0.7` usable, :math:`\\hat k \\ge 0.7` unreliable (the proposal's tails are too light).
* :func:`build_inference_data`, :func:`from_pyro_mcmc`, :func:`add_log_likelihood`, :func:`save_netcdf`,
  :func:`load_netcdf` — :class:`arviz.InferenceData` built with named dimensions and written to netCDF atomically.
* :func:`summary`, :func:`ess`, :func:`rhat`, :func:`loo`, :func:`compare` — ArviZ's functions.

**What goes where** (ArviZ's conventions, so that its functions never misread a file):

* ``posterior`` holds draws ``(chain, draw, ...)`` of a posterior (NUTS, or a variational posterior's draws),
  and ``log_likelihood`` the pointwise :math:`\\log p(x_i \\mid \\theta_s)` of *those* draws, ``(chain, draw,
  datapoint)``: ``az.loo``/``az.compare`` read them, so a ``log_likelihood`` group is only ever written beside a
  ``posterior`` with the same chains and draws.  ``observed_data`` shares the datapoint dimension's name,
  :data:`DATAPOINT_DIM`.
* Per-datapoint results of a variational fit that are *not* draws — the IWAE estimate of :math:`\\log p(x_i)`,
  the ELBO, KL and PSIS :math:`\\hat k` per datapoint — go to the group :data:`VI_EVALUATION`, and training
  curves to :data:`VI_TRAINING`: groups without ``chain``/``draw`` that ArviZ's statistics do not read.
  :func:`summary` summarises them over the datapoints (mean, sd, HDI; no ESS or R-hat: datapoints are not draws).
"""

from __future__ import annotations

import os
import warnings
from typing import Mapping, Sequence

import numpy as np

from ppl_models.atomic import atomic_path

with warnings.catch_warnings():
    # ArviZ 0.2x prints this FutureWarning (at most once a day) on import: silenced for the import only, by its
    # text (no process-wide filter is left behind).
    warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning)
    import arviz as az

__all__ = [
    "KHAT_GOOD",
    "KHAT_BAD",
    "DATAPOINT_DIM",
    "VI_EVALUATION",
    "VI_TRAINING",
    "psis_khat",
    "build_inference_data",
    "save_netcdf",
    "load_netcdf",
    "summary",
    "ess",
    "rhat",
    "loo",
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

#: The datapoint dimension's name in every group (``observed_data``, ``log_likelihood``, :data:`VI_EVALUATION`).
DATAPOINT_DIM = "datapoint"
#: Per-datapoint results of a variational fit that are not posterior draws (IWAE estimate, ELBO, KL, k̂).
VI_EVALUATION = "vi_evaluation"
#: Training curves of a variational fit (the ELBO against the step).
VI_TRAINING = "vi_training"
_DRAW_GROUPS = ("posterior", "sample_stats", "log_likelihood")

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


def _sizes(group: str, name: str, array: np.ndarray, dims) -> dict:
    if len(dims) != array.ndim:
        raise ValueError(f"{group} {name!r}: shape {array.shape} needs {array.ndim} dimension names, received "
                         f"{list(dims)}")
    return dict(zip(dims, array.shape))


def _check_pointwise(name: str, a: np.ndarray, draws_shape: tuple) -> None:
    """A pointwise log-likelihood ``a`` must be ``(chain, draw, n)`` with the posterior's ``draws_shape``."""
    if a.ndim != 3 or a.shape[:2] != tuple(draws_shape):
        raise ValueError(f"log_likelihood {name!r}: expected shape (chain, draw, n) with the posterior's "
                         f"(chain, draw) {tuple(draws_shape)}, received {a.shape}")


def build_inference_data(
    *,
    posterior: Mapping[str, np.ndarray] | None = None,
    sample_stats: Mapping[str, np.ndarray] | None = None,
    log_likelihood: Mapping[str, np.ndarray] | None = None,
    observed_data: Mapping[str, np.ndarray] | None = None,
    vi_evaluation: Mapping[str, np.ndarray] | None = None,
    vi_training: Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping | None = None,
    descriptions: Mapping[str, str] | None = None,
) -> az.InferenceData:
    """An :class:`arviz.InferenceData` with every dimension named (see the module docstring for what goes where).

    :param posterior: draws ``(chain, draw, ...)``, e.g. ``{"locs": (chains, draws, K, D)}``.
    :param sample_stats: per-draw statistics of the sampler ``(chain, draw, ...)``.
    :param log_likelihood: pointwise log-likelihoods of the posterior's draws, ``{"x": (chain, draw, n)}``, the
        last dimension :data:`DATAPOINT_DIM`; needs ``posterior`` with the same chains and draws.
    :param observed_data: ``{"x": (n, ...)}``; its first dimension is :data:`DATAPOINT_DIM` (``dims["x"]``
        names all of them, starting with it).
    :param vi_evaluation: per-datapoint results that are not draws (:data:`VI_EVALUATION`), any shape.
    :param vi_training: training curves (:data:`VI_TRAINING`), any shape.
    :param dims: names of the dimensions after ``(chain, draw)`` (draw groups) or of all of them (the others);
        required for every variable of ``observed_data``, ``vi_evaluation`` and ``vi_training``.
    :param coords: coordinates; :data:`DATAPOINT_DIM` defaults to ``0 .. n-1``.
    :param attrs: attributes of every group (numbers, strings and lists of them: netCDF attributes).
    :param descriptions: a ``description`` attribute per variable name.
    :raises ValueError: naming the group and variable whose shape or dimension names do not fit.
    """
    dims = {k: list(v) for k, v in (dims or {}).items()}
    groups = {"posterior": posterior, "sample_stats": sample_stats, "log_likelihood": log_likelihood,
              "observed_data": observed_data, VI_EVALUATION: vi_evaluation, VI_TRAINING: vi_training}
    groups = {g: {k: np.asarray(v) for k, v in values.items()} for g, values in groups.items() if values}
    draws_shape = None
    for name, a in groups.get("posterior", {}).items():
        if a.ndim < 2 or (draws_shape is not None and a.shape[:2] != draws_shape):
            raise ValueError(f"posterior {name!r}: expected shape (chain, draw, ...) with the (chain, draw) of the "
                             f"other variables {draws_shape}, received {a.shape}")
        draws_shape = a.shape[:2]
    for name, a in groups.get("sample_stats", {}).items():
        if a.ndim < 2:
            raise ValueError(f"sample_stats {name!r}: expected shape (chain, draw, ...), received {a.shape}")
    for name, a in groups.get("log_likelihood", {}).items():
        if draws_shape is None:
            raise ValueError(f"log_likelihood {name!r}: pointwise log-likelihoods are of posterior draws (az.loo "
                             "reads them as such); received no posterior. Per-datapoint estimates that are not "
                             f"draws belong to the {VI_EVALUATION!r} group")
        _check_pointwise(name, a, draws_shape)
        dims[f"log_likelihood/{name}"] = [DATAPOINT_DIM]
    sizes: dict = {}
    for group in ("observed_data", VI_EVALUATION, VI_TRAINING):
        for name, a in groups.get(group, {}).items():
            if name not in dims:
                raise ValueError(f"{group} {name!r}: name its {a.ndim} dimensions in dims")
            if group == "observed_data" and dims[name][:1] != [DATAPOINT_DIM]:
                raise ValueError(f"observed_data {name!r}: the first dimension is {DATAPOINT_DIM!r}, received "
                                 f"dims {dims[name]}")
            for dim, size in _sizes(group, name, a, dims[name]).items():
                sizes.setdefault(dim, size)
    for name, a in groups.get("log_likelihood", {}).items():
        n = sizes.setdefault(DATAPOINT_DIM, a.shape[-1])
        if a.shape[-1] != n:
            raise ValueError(f"log_likelihood {name!r}: {a.shape[-1]} datapoints, the other groups have {n}")
    coords = dict(coords or {})
    if DATAPOINT_DIM in sizes:
        coords.setdefault(DATAPOINT_DIM, np.arange(sizes[DATAPOINT_DIM]))
    datasets = {}
    for group, values in groups.items():
        group_dims = {k: dims.get(f"{group}/{k}", dims.get(k)) for k in values}
        group_dims = {k: v for k, v in group_dims.items() if v is not None}
        datasets[group] = az.dict_to_dataset(values, attrs=dict(attrs or {}), coords=coords, dims=group_dims,
                                             default_dims=None if group in _DRAW_GROUPS else [])
        for name, text in (descriptions or {}).items():
            if name in datasets[group]:
                datasets[group][name].attrs["description"] = text
    with warnings.catch_warnings():
        # (seeds, draws) posteriors of a few draws are intended (each seed's q is a chain).
        warnings.filterwarnings("ignore", message=r"More chains \(\d+\) than draws", category=UserWarning)
        return az.InferenceData(**datasets)


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
    """``az.summary``: posterior means, sds, ESS and R-hat as a table.

    An InferenceData without a posterior but with a :data:`VI_EVALUATION` group (``eval.nc``, a comparison's
    problem with local latents) is summarised over its datapoints instead: per variable that has a
    :data:`DATAPOINT_DIM`, ``az.summary(kind="stats")`` of its finite values (mean, sd, HDI across datapoints and
    any other dimension such as ``seed``; no ESS or R-hat, the datapoints are not draws), and ``n_finite``; a
    variable without finite values is left out.
    """
    if isinstance(data, az.InferenceData) and "posterior" not in data.groups() and VI_EVALUATION in data.groups():
        import pandas as pd

        rows = []
        for name, var in getattr(data, VI_EVALUATION).data_vars.items():
            if DATAPOINT_DIM not in var.dims:
                continue
            values = np.asarray(var.values, dtype=np.float64).reshape(-1)
            finite = values[np.isfinite(values)]
            if finite.size:  # e.g. k̂ of one importance sample per datapoint: none (a row of NaN says nothing)
                table = az.summary({name: finite[None]}, kind="stats", **kwargs)
                table["n_finite"] = finite.size
                rows.append(table)
        if not rows:
            raise ValueError(f"summary: the {VI_EVALUATION!r} group has no finite values along {DATAPOINT_DIM!r}")
        return pd.concat(rows)
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


def from_pyro_mcmc(mcmc, *, log_likelihood: Mapping[str, np.ndarray] | None = None, dims=None, coords=None):
    """``az.from_pyro`` of a finished :class:`pyro.infer.MCMC` run: posterior, NUTS sample stats, observed data.

    :param log_likelihood: ``{"x": (chains, draws, n)}``, computed by the caller (ArviZ's own pass re-runs the
        model on every draw, which fails for models that enumerate a site); see :func:`add_log_likelihood`.
    :param dims: dimension names per site after ``(chain, draw)``, e.g. ``{"locs": ["component", "data_dim"],
        "x": ["datapoint", "data_dim"]}``; an observed site's first one must be :data:`DATAPOINT_DIM`.
    :param coords: their coordinates.
    """
    idata = az.from_pyro(mcmc, log_likelihood=False, dims=dims, coords=coords)
    if "observed_data" in idata.groups():
        for name, var in idata.observed_data.data_vars.items():
            if var.dims[:1] != (DATAPOINT_DIM,):
                raise ValueError(f"from_pyro_mcmc: observed site {name!r} has dims {var.dims}; name the first "
                                 f"{DATAPOINT_DIM!r} in dims")
    if log_likelihood:
        add_log_likelihood(idata, log_likelihood)
    return idata


def add_log_likelihood(idata: az.InferenceData, log_likelihood: Mapping[str, np.ndarray]):
    """Add (or replace) the ``log_likelihood`` group: ``{"x": (chains, draws, n)}``, the pointwise log-likelihood
    of the posterior's draws along :data:`DATAPOINT_DIM` (the ``observed_data`` group's, where there is one)."""
    if "posterior" not in idata.groups():
        raise ValueError("add_log_likelihood: pointwise log-likelihoods are of posterior draws; the InferenceData "
                         "has no posterior")
    post = idata.posterior
    draws_shape = (post.sizes["chain"], post.sizes["draw"])
    groups = {}
    for name, a in log_likelihood.items():
        a = np.asarray(a)
        _check_pointwise(name, a, draws_shape)
        if "observed_data" in idata.groups() and name in idata.observed_data:
            n = idata.observed_data.sizes.get(DATAPOINT_DIM)
            if n != a.shape[-1]:
                raise ValueError(f"log_likelihood {name!r}: {a.shape[-1]} datapoints, observed_data has {n}")
        groups[name] = a
    coords = {"chain": post["chain"].values, "draw": post["draw"].values, DATAPOINT_DIM: np.arange(a.shape[-1])}
    dataset = az.dict_to_dataset(groups, coords=coords, dims={k: [DATAPOINT_DIM] for k in groups})
    if "log_likelihood" in idata.groups():
        del idata.log_likelihood
    idata.add_groups(log_likelihood=dataset)
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
