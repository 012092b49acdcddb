r"""Honest evaluation of any model and guide that follow the package's conventions: importance sampling.

For a datapoint :math:`x` and :math:`K` draws :math:`z_k \sim q(z \mid x)` from the guide, the log
importance weights are

.. math::  \log w_k = \log p(x, z_k) - \log q(z_k \mid x),

with :math:`\log p(x, z) = \log p(x \mid z) + \log p(z)` summed over the model's sites inside the data
plate.  Per datapoint :func:`evaluate` reports

* ``log_likelihood`` — the importance-weighted bound (IWAE, Burda et al. 2016)
  :math:`\log \frac1K \sum_k w_k \le \log p(x)`, which tends to :math:`\log p(x)` as :math:`K \to \infty`;
* ``elbo`` — :math:`\frac1K \sum_k \log w_k`, the Monte Carlo ELBO (:math:`\le` the IWAE bound for the same draws);
* ``recon`` — :math:`\frac1K \sum_k \log p(x \mid z_k)` (the observed sites' terms) and
  ``kl`` — :math:`\frac1K \sum_k [\log q(z_k \mid x) - \log p(z_k)]` (the latent sites' terms), so that
  ``elbo = recon - kl``;
* ``pareto_khat`` — the PSIS :math:`\hat k` of the :math:`K` weights (:func:`ppl_models.infer.diagnostics.psis_khat`):
  above 0.7 the IWAE estimate is not to be trusted (Vehtari et al. 2024).  With :math:`K = 1` there is no tail
  to fit: :math:`\hat k` is skipped (NaN), with a note in ``EvalResult.notes``.

How the draws are vectorized: the guide and the model (replayed on the guide's draws) run inside an outer
``pyro.plate("num_samples", chunk, dim=sample_dim)`` on the first dimension left of every plate and
batch dimension the model uses, and each site's ``fn.log_prob(value)`` has shape ``(chunk, batch)`` after
summing any plates nested inside the data plate.  Both are called with ``idx`` (the datapoints' rows, which
per-datapoint guides need) and ``num_data=None``, so no site is scaled by ``num_data / batch``.
Only local latents are supported: a latent site outside the data plate raises :class:`NotImplementedError`.

Cost (VAE 784-400-20, binarized MNIST, one CPU thread of the project's 2-core AMD EPYC, fp32): about
15 µs per sample and datapoint, two thirds of it the decoder's ``Linear`` layers (the 400 x 784 one alone is
0.63 MFLOP, ~11 µs at the ~57 GFLOP/s MKL reaches per core), a fifth the Bernoulli log-density's softplus.
IWAE with K = 5000 over the 10k test images is 5e7 decoder rows: ~760 CPU-seconds, so ~7 minutes on both
cores of an idle machine; torch's own Bernoulli ``log_prob`` with 64 MiB chunks costs 27 µs per row.

References:
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders.
    Vehtari, Simpson, Gelman, Yao & Gabry (2024), Pareto Smoothed Importance Sampling.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch.distributions import Bernoulli, Independent

from ppl_models.distributions import BINARY_DTYPES, binary_bernoulli_log_prob
from ppl_models.infer import diagnostics
from ppl_models.infer.threads import ThreadTuner
from ppl_models.atomic import atomic_write_bytes
from ppl_models.data import TensorDataset
from ppl_models.registry import unscaled
from ppl_models.spec import ModelSpec, check_tensor

__all__ = [
    "MEMORY_BUDGET_BYTES",
    "EvalResult",
    "default_chunk_size",
    "log_weights",
    "evaluate",
]

#: Default bound on one ``(chunk, batch) + event_shape`` tensor of the model's largest declared site: 24 MiB.
#: Below glibc's largest mmap threshold (32 MiB) freed blocks are reused from the heap; above it every
#: chunk's tensors are fresh mmaps whose page faults cost about as much as the softplus of the logits
#: (VAE 784-400-20, measured: 15.3 µs per sample and datapoint at 8k rows a chunk, 21.8 at 13k).
MEMORY_BUDGET_BYTES = 24 * 2**20

#: ``evaluate(fast_path="auto")``: expected seconds to compile a chunk's graph and the fraction of the evaluation
#: time compiling saves (benchmarks/bench_evaluate.py, VAE 784-400-20: 1.3x Pyro's evaluator on one thread, 1.56x
#: on two; compiling took 10-20 s).
EVAL_COMPILE_COST_S = 20.0
EVAL_COMPILE_SAVING = 0.2

#: Name of the outer plate over importance samples.
SAMPLES_PLATE = "num_samples"

# Metrics summarized as mean ± standard error over datapoints, in this order.
_SUMMED = ("log_likelihood", "elbo", "recon", "kl")


# ---------------------------------------------------------------------------------------------------------
# Site log-densities
# ---------------------------------------------------------------------------------------------------------


def _site_log_prob(site: dict, grouped: bool = False) -> torch.Tensor:
    """``site["fn"].log_prob(site["value"])`` with the site's mask applied (never its scale).

    ``Independent(Bernoulli(logits=...))`` sites with binary values take an exact faster path
    (:func:`~ppl_models.distributions.binary_bernoulli_log_prob`, 3.8 instead of 5.5 µs per 784-pixel row on
    one core; ``grouped``: its form for compiled graphs).
    """
    fn, value = site["fn"], site["value"]
    base, event_dims, plain = fn, 0, True
    while isinstance(base, Independent):
        plain = plain and type(base).log_prob is Independent.log_prob
        event_dims += base.reinterpreted_batch_ndims
        base = base.base_dist
    if (
        plain
        and event_dims > 0
        and type(base).log_prob is Bernoulli.log_prob
        and "logits" in base.__dict__  # built from logits (lazy_property caches it in __dict__)
        and base.logits.dtype in BINARY_DTYPES
        and value.dtype == base.logits.dtype
        and bool(((value == 0) | (value == 1)).all())  # ~0.2 ms a chunk: the signed form is exact only then
    ):
        if base._validate_args:
            base._validate_sample(value)
        log_p = binary_bernoulli_log_prob(base.logits, value, event_dims, grouped)
    else:
        log_p = fn.log_prob(value)
    mask = site["mask"]
    if mask is not None and mask is not True:
        log_p = scale_and_mask(log_p, 1.0, mask)
    return log_p


# ---------------------------------------------------------------------------------------------------------
# Structure of a model/guide pair
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    sample_dim: int  # dim of the outer samples plate (negative)
    data_dim: int  # dim of the data plate (negative)
    observed: Tuple[str, ...]  # the model's observed sites (the spec's first)
    latents: Tuple[str, ...]  # the model's latent sites (all sampled by the guide)


def _is_traced_sample(site: dict) -> bool:
    return (
        site["type"] == "sample"
        and not site_is_subsample(site)
        and not site["infer"].get("_deterministic", False)
        and not site["infer"].get("_do_not_trace", False)
    )


def _data_frame(site: dict, plate: str):
    for frame in site["cond_indep_stack"]:
        if frame.name == plate:
            return frame
    return None


def _inspect(model, guide, data: tuple, idx, spec: ModelSpec, kwargs: dict) -> _Layout:
    """One unvectorized run of guide and replayed model: check the structure, find the free plate dim."""
    guide_trace = poutine.trace(guide).get_trace(*data, idx, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*data, idx, **kwargs)
    plate = spec.data_plate
    used, data_dims = 1, set()
    guide_latents = set()
    for where, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in trace.nodes.items():
            if not _is_traced_sample(site):
                continue
            if SAMPLES_PLATE in (f.name for f in site["cond_indep_stack"]):
                raise ValueError(
                    f"{where} site {name!r}: the plate name {SAMPLES_PLATE!r} is reserved for the evaluator"
                )
            frame = _data_frame(site, plate)
            if frame is None:
                kind = "observed site" if site["is_observed"] else "latent site"
                raise NotImplementedError(
                    f"{where} {kind} {name!r} lies outside the data plate {plate!r} (a global site); "
                    "importance-sampled evaluation supports local latents only (one per datapoint inside "
                    f"the plate {plate!r})"
                )
            if frame.dim is None:
                raise ValueError(f"{where} site {name!r}: the data plate {plate!r} must be vectorized (have a dim)")
            data_dims.add(frame.dim)
            used = max(used, len(site["fn"].batch_shape), *(-f.dim for f in site["cond_indep_stack"] if f.dim))
            if where == "guide" and not site["is_observed"]:
                guide_latents.add(name)
    if len(data_dims) != 1:
        raise ValueError(f"the data plate {plate!r} is used at more than one dim: {sorted(data_dims)}")
    observed, latents = [], []
    for name, site in model_trace.nodes.items():
        if not _is_traced_sample(site):
            continue
        if site["is_observed"]:
            observed.append(name)
        elif name not in guide_latents:
            raise ValueError(
                f"model latent site {name!r}: expected the guide to sample it (the evaluator replays the model "
                f"on the guide's draws), but the guide samples only {sorted(guide_latents) or '(none)'}"
            )
        else:
            latents.append(name)
    extra = sorted(guide_latents - set(latents))
    if extra:
        raise ValueError(
            f"guide site {extra[0]!r}: expected a latent site of the model, the model has none of that name"
        )
    if spec.observed.name not in observed:
        raise ValueError(
            f"observed site {spec.observed.name!r} (from the spec of {spec.name!r}): expected an observed sample "
            f"site of that name in the model, found observed sites {observed or '(none)'}"
        )
    observed.remove(spec.observed.name)
    return _Layout(-(used + 1), data_dims.pop(), (spec.observed.name, *observed), tuple(latents))


def _per_datapoint(log_p: torch.Tensor, layout: _Layout, name: str, shape: Tuple[int, int]) -> torch.Tensor:
    """Sum a site's log-density over every dim but the samples and data plates: ``(chunk, batch)``."""
    ndim = -layout.sample_dim
    if log_p.dim() > ndim:
        raise ValueError(
            f"site {name!r}: log_prob has shape {tuple(log_p.shape)}, more batch dims than the plates declare "
            f"(batch dims only through pyro.plate, event dims through .to_event)"
        )
    log_p = log_p.reshape((1,) * (ndim - log_p.dim()) + tuple(log_p.shape))
    data_axis = ndim + layout.data_dim
    other = [d for d in range(1, ndim) if d != data_axis]
    if other:
        log_p = log_p.sum(other, keepdim=True)
    return log_p.reshape(log_p.shape[0], log_p.shape[data_axis]).expand(shape)


# ---------------------------------------------------------------------------------------------------------
# Log weights
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Terms:
    """Per sample and datapoint, each ``(num_samples, batch)``: the three parts of the log weights."""

    log_lik: torch.Tensor  # Σ observed sites  log p(x | z)
    log_prior: torch.Tensor  # Σ model latent sites  log p(z)
    log_q: torch.Tensor  # Σ guide latent sites  log q(z | x)

    @property
    def log_weights(self) -> torch.Tensor:
        return self.log_lik + self.log_prior - self.log_q


def default_chunk_size(
    spec: ModelSpec, batch_size: int, *, itemsize: int = 4, budget_bytes: int = MEMORY_BUDGET_BYTES
) -> int:
    """Samples per vectorized call so that one ``(chunk, batch) + event_shape`` tensor of the model's largest
    declared site (observed or latent) stays within ``budget_bytes``; at least 1."""
    largest = max([math.prod(spec.observed.event_shape)] + [s.numel for s in spec.local_latents])
    return max(1, int(budget_bytes // max(1, batch_size * largest * itemsize)))


def _as_data(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _batch_size(data: tuple, idx) -> int:
    if idx is not None:
        return int(idx.shape[0])
    for a in data:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return int(a.shape[0])
    raise ValueError("log_weights: cannot tell the batch size: pass idx or a data tensor with a batch dim")


def _chunk_terms(model: Callable, guide: Callable, data: tuple, idx, *, size: int, batch: int, layout: _Layout,
                 kwargs: dict, grouped: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log p(x | z), log p(z), log q(z | x))``, each ``(size, batch)``, for ``size`` draws per datapoint
    (``grouped``: the binary Bernoulli densities in their compiled form,
    :func:`~ppl_models.distributions.binary_bernoulli_log_prob`)."""
    with pyro.plate(SAMPLES_PLATE, size, dim=layout.sample_dim):
        guide_trace = poutine.trace(guide).get_trace(*data, idx, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*data, idx, **kwargs)
    shape = (size, batch)
    log_lik = sum(_per_datapoint(_site_log_prob(model_trace.nodes[n], grouped), layout, n, shape)
                  for n in layout.observed)
    log_prior = sum(_per_datapoint(_site_log_prob(model_trace.nodes[n]), layout, n, shape) for n in layout.latents)
    log_q = sum(_per_datapoint(_site_log_prob(guide_trace.nodes[n]), layout, n, shape) for n in layout.latents)
    if not layout.latents:  # a model without latents: log p(z) = log q(z) = 0
        log_prior = log_q = torch.zeros(shape, dtype=log_lik.dtype)
    return log_lik, log_prior, log_q


def _log_terms(
    model: Callable,
    guide: Callable,
    data: tuple,
    idx,
    *,
    num_samples: int,
    spec: ModelSpec,
    chunk_size: int | None,
    layout: _Layout | None,
    kwargs: dict,
    fast=None,
) -> Tuple[_Terms, _Layout]:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive integer, received {num_samples!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive integer or None, received {chunk_size!r}")
    if "num_data" in kwargs:
        raise ValueError("num_data: the evaluator calls model and guide with num_data=None (no subsample scaling)")
    kwargs = {**kwargs, **unscaled(model, guide)}  # a bound model's default num_data would scale the batch
    batch = _batch_size(data, idx)
    if layout is None:
        layout = _inspect(model, guide, data, idx, spec, kwargs)
    if chunk_size is None:
        itemsize = next((a.element_size() for a in data if isinstance(a, torch.Tensor) and a.is_floating_point()), 4)
        chunk_size = default_chunk_size(spec, batch, itemsize=itemsize)
    chunk_size = min(chunk_size, num_samples)
    parts = None
    compiled = fast is not None and fast.mode == "compile"  # the captured graph in its compiled form
    for start in range(0, num_samples, chunk_size):
        size = min(chunk_size, num_samples - start)
        chunk = functools.partial(_chunk_terms, model, guide, size=size, batch=batch, layout=layout, kwargs=kwargs)
        terms = fast.chunk_terms(functools.partial(chunk, grouped=compiled), data, idx) if fast is not None else None
        log_lik, log_prior, log_q = terms if terms is not None else chunk(data, idx)
        if parts is None:
            dtype = torch.promote_types(torch.promote_types(log_lik.dtype, log_prior.dtype), log_q.dtype)
            parts = [torch.empty(num_samples, batch, dtype=dtype, device=log_lik.device) for _ in range(3)]
        for out, value in zip(parts, (log_lik, log_prior, log_q)):
            out[start : start + size] = value
    return _Terms(*parts), layout


def log_weights(
    model: Callable,
    guide: Callable,
    x,
    idx: torch.Tensor | None = None,
    *,
    num_samples: int,
    spec: ModelSpec,
    chunk_size: int | None = None,
    **kwargs,
) -> torch.Tensor:
    r"""Log importance weights :math:`\log p(x_i, z_{k}) - \log q(z_{k} \mid x_i)`, :math:`z_k \sim q(z \mid x_i)`.

    :param model: a model ``model(*data, idx, **kwargs)`` following the package's conventions.
    :param guide: its guide, same signature.
    :param x: the model's data arguments before ``idx``: a tensor of shape ``(batch,) + event_shape`` or a
        tuple of them.
    :param idx: rows of the batch in the data set, shape ``(batch,)`` (needed by per-datapoint guides;
        ``None`` when the batch is the whole data set or the guide is amortized).
    :param num_samples: :math:`K`, draws per datapoint.
    :param spec: the model's declared structure (its data plate and observed site).
    :param chunk_size: samples per vectorized call; ``None``: :func:`default_chunk_size`.
    :param kwargs: further keywords of model and guide (never ``num_data``: no subsample scaling here).
    :return: shape ``(num_samples, batch)``, in the dtype of the model's log-densities.
    :raises NotImplementedError: a latent (or observed) site lies outside the data plate.
    """
    with torch.no_grad():
        terms, _ = _log_terms(
            model,
            guide,
            _as_data(x),
            idx,
            num_samples=num_samples,
            spec=spec,
            chunk_size=chunk_size,
            layout=None,
            kwargs=kwargs,
        )
        return terms.log_weights


# ---------------------------------------------------------------------------------------------------------
# Evaluation over a data set
# ---------------------------------------------------------------------------------------------------------


def _finite_or_none(v: float):
    return float(v) if math.isfinite(v) else None


@dataclass
class EvalResult:
    """Per-datapoint importance-sampling estimates (numpy float64 arrays of shape ``(num_data,)``) and summaries.

    ``log_likelihood`` is the IWAE bound with ``num_samples`` draws, ``elbo = recon - kl`` the Monte Carlo ELBO,
    ``pareto_khat`` the PSIS :math:`\\hat k` of each datapoint's weights (``inf`` when they are all equal).
    """

    model_name: str
    observed_name: str
    num_samples: int
    log_likelihood: np.ndarray
    elbo: np.ndarray
    recon: np.ndarray
    kl: np.ndarray
    pareto_khat: np.ndarray
    wall_time_s: float
    timings_s: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)  # what was skipped and why (e.g. k-hat with one sample)
    checkpoint: Optional[str] = None  # the checkpoint evaluated (set by the caller that loaded it) ...
    checkpoint_step: Optional[int] = None  # ... and its training step; both go to metrics.json

    @property
    def num_data(self) -> int:
        return int(self.log_likelihood.shape[0])

    def mean_and_se(self, name: str) -> Tuple[float, float]:
        """Mean over datapoints and its standard error ``std / sqrt(n)`` (``std`` with ``ddof=1``)."""
        values = np.asarray(getattr(self, name), dtype=np.float64)
        n = values.shape[0]
        se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        return float(values.mean()), se

    def to_metrics(self) -> dict:
        """JSON-serializable summary: ``<name>`` (mean) and ``<name>_se`` for log_likelihood, elbo, recon, kl;
        ``pareto_khat_{mean,max}`` over the finite :math:`\\hat k`, the fractions of datapoints with
        :math:`\\hat k < 0.5` (``_frac_good``), :math:`\\hat k \\ge 0.7` (``_frac_bad``) and :math:`\\hat k` not finite
        (``_frac_undetermined``: all weights equal, too few samples for a tail, or NaN weights); the wall time.
        Non-finite numbers are written as ``null``."""
        metrics: dict = {
            "model": self.model_name,
            "observed": self.observed_name,
            "num_data": self.num_data,
            "num_samples": self.num_samples,
        }
        for name in _SUMMED:
            mean, se = self.mean_and_se(name)
            metrics[name], metrics[f"{name}_se"] = _finite_or_none(mean), _finite_or_none(se)
        k = self.pareto_khat
        finite = k[np.isfinite(k)]
        metrics["pareto_khat_mean"] = _finite_or_none(finite.mean()) if finite.size else None
        metrics["pareto_khat_max"] = _finite_or_none(finite.max()) if finite.size else None
        metrics["pareto_khat_frac_good"] = float(np.mean(np.isfinite(k) & (k < diagnostics.KHAT_GOOD)))
        metrics["pareto_khat_frac_bad"] = float(np.mean(np.isfinite(k) & (k >= diagnostics.KHAT_BAD)))
        metrics["pareto_khat_frac_undetermined"] = float(np.mean(~np.isfinite(k)))
        metrics["wall_time_s"] = float(self.wall_time_s)
        metrics["timings_s"] = {key: float(v) for key, v in self.timings_s.items()}
        if self.checkpoint_step is not None:
            metrics["checkpoint"], metrics["checkpoint_step"] = self.checkpoint, int(self.checkpoint_step)
        if self.notes:
            metrics["notes"] = list(self.notes)
        return metrics

    def to_inference_data(self):
        """An :class:`arviz.InferenceData` whose group ``vi_evaluation`` holds ``log_likelihood`` (the IWAE
        estimate), ``elbo``, ``recon``, ``kl`` and ``pareto_khat`` along ``datapoint``: estimates per datapoint,
        not posterior draws, so no ``posterior``/``log_likelihood`` group that ``az.loo`` or ``az.waic`` would
        misread (:mod:`ppl_models.infer.diagnostics`)."""
        k, names = self.num_samples, (*_SUMMED, "pareto_khat")
        text = (f"IWAE estimate of log p(x_i), K={k}", f"ELBO, K={k}", "E_q log p(x_i | z)", "E_q log q(z | x_i)/p(z)",
                f"PSIS k-hat of the K={k} weights (NaN, inf: undetermined)")
        return diagnostics.build_inference_data(
            vi_evaluation={n: getattr(self, n) for n in names}, dims={n: [diagnostics.DATAPOINT_DIM] for n in names},
            attrs={"model": self.model_name, "observed": self.observed_name, "num_samples": k, "estimator": "iwae"},
            descriptions=dict(zip(names, text)))

    def save(self, run_dir) -> Dict[str, str]:
        """Write ``metrics.json`` (atomically: a temporary file, then ``os.replace``) and ``eval.nc``.

        :return: the paths written, ``{"metrics": ..., "inference_data": ...}``.
        """
        run_dir = os.fspath(run_dir)
        metrics_path = os.path.join(run_dir, "metrics.json")
        text = json.dumps(self.to_metrics(), indent=2, allow_nan=False) + "\n"
        atomic_write_bytes(metrics_path, lambda f: f.write(text.encode()))
        nc_path = diagnostics.save_netcdf(self.to_inference_data(), os.path.join(run_dir, "eval.nc"))
        return {"metrics": metrics_path, "inference_data": nc_path}


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm  # a dependency

    return tqdm(total=total, unit="datapoint", desc="evaluate", leave=False) if enabled else None


def evaluate(
    model: Callable,
    guide: Callable,
    dataset,
    *,
    spec: ModelSpec,
    num_samples: int = 5000,
    batch_size: int = 100,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    fast_path: object = False,
    **model_kwargs,
) -> EvalResult:
    r"""Importance-sampled evaluation of every datapoint of ``dataset`` (see the module docstring).

    :param model: a model ``model(*data, idx, **model_kwargs)``.
    :param guide: its guide, same signature.
    :param dataset: a data set with ``num_data`` and ``batch(idx, generator) -> tuple`` of the model's data
        arguments before ``idx`` (the engine's protocol), or a tensor ``x`` of shape ``(num_data,) + event_shape``.
    :param spec: the model's declared structure.
    :param num_samples: :math:`K`, draws from the guide per datapoint.
    :param batch_size: datapoints per batch (the guide and the model see ``batch_size`` rows at once).
    :param chunk_size: samples per vectorized call; ``None``: :func:`default_chunk_size` for ``batch_size``.
    :param generator: source of randomness: the data set's batches and (through a seed drawn from it, inside
        :func:`torch.random.fork_rng`) the guide's draws; ``None``: torch's global generator.
    :param progress: show a progress bar.
    :param fast_path: ``False`` (Pyro every chunk), ``True``/``"eager"`` (each chunk's computation captured
        once and replayed, :class:`~ppl_models.infer.fastpath.CapturedTerms`), ``"compile"`` (the captured
        graph compiled by inductor) or ``"auto"`` (the first batch through Pyro, then compiled when the rest
        of the evaluation, at that batch's pace, would save more than :data:`EVAL_COMPILE_COST_S`, else Pyro
        throughout).  Same draws, same results up to float rounding.
    :param model_kwargs: further keywords of model and guide.
    """
    from ppl_models.infer.failures import data_rows_named
    from ppl_models.infer.fastpath import CapturedTerms, fast_path_mode

    mode = fast_path_mode(fast_path)
    if isinstance(dataset, torch.Tensor):
        check_tensor(spec.observed.name, dataset, event_shape=spec.observed.event_shape)
        dataset = TensorDataset(dataset)
    num_data = int(dataset.num_data)
    if num_data < 1:
        raise ValueError(f"dataset: expected at least one datapoint, received num_data={num_data}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, received {batch_size!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive integer, received {num_samples!r}")
    out = {name: np.empty(num_data) for name in (*_SUMMED, "pareto_khat")}
    notes = []
    if num_samples < 2:  # PSIS fits a tail to at least 2 weights per datapoint
        out["pareto_khat"][:] = np.nan
        notes.append(f"pareto_khat skipped: it needs at least 2 importance samples per datapoint, num_samples={num_samples}")
    timings = {"sampling_s": 0.0, "psis_s": 0.0}
    bar = _progress(num_data, progress)
    started = time.perf_counter()
    layout = None
    rng_context = torch.random.fork_rng(devices=[]) if generator is not None else contextlib.nullcontext()
    try:
        # one thread or all, whichever is faster now (ppl_models.infer.threads): a busy machine costs little
        tuner = ThreadTuner("auto", interval=120.0, probe_steps=1, warmup_steps=1, rounds=1, skip_first=False)
        with rng_context, torch.no_grad(), tuner:
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
            log_k = math.log(num_samples)
            fast = CapturedTerms(mode) if mode in ("eager", "compile") else None
            for start in range(0, num_data, batch_size):
                if mode == "auto" and start == batch_size:  # decide after the first batch
                    left = (num_data - start) / batch_size * timings["sampling_s"]
                    if left * EVAL_COMPILE_SAVING > EVAL_COMPILE_COST_S:  # else Pyro throughout: capturing
                        fast = CapturedTerms("compile")  # alone does not pay for itself in a short evaluation
                idx = torch.arange(start, min(start + batch_size, num_data))
                data = _as_data(dataset.batch(idx, generator))
                t0 = time.perf_counter()
                with data_rows_named(data, idx, what="evaluated data"):
                    terms, layout = _log_terms(model, guide, data, idx, num_samples=num_samples, spec=spec,
                                               chunk_size=chunk_size, layout=layout, kwargs=model_kwargs, fast=fast)
                lw = terms.log_weights  # (K, batch)
                rows = slice(start, start + idx.shape[0])
                out["log_likelihood"][rows] = (torch.logsumexp(lw, 0) - log_k).double().cpu().numpy()
                out["elbo"][rows] = lw.mean(0).double().cpu().numpy()
                out["recon"][rows] = terms.log_lik.mean(0).double().cpu().numpy()
                out["kl"][rows] = (terms.log_q - terms.log_prior).mean(0).double().cpu().numpy()
                t1 = time.perf_counter()
                # k̂ a batch at a time, from float32 weights: memory stays O(batch × K).
                if num_samples > 1:
                    out["pareto_khat"][rows] = diagnostics.psis_khat(lw.T.float().cpu().numpy())
                t2 = time.perf_counter()
                timings["sampling_s"] += t1 - t0
                timings["psis_s"] += t2 - t1
                tuner.after_step(t2 - t0)
                if bar is not None:
                    bar.update(idx.shape[0])
    finally:
        if bar is not None:
            bar.close()
    return EvalResult(
        model_name=spec.name,
        observed_name=spec.observed.name,
        num_samples=num_samples,
        wall_time_s=time.perf_counter() - started,
        timings_s=timings,
        notes=notes,
        **out,
    )

