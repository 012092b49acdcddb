r"""Objectives and their gradient estimators by name: one vocabulary for ``fit`` and ``compare``.

An *estimator* is an objective (what is optimized) plus its gradient rule (how draws of the guide enter the
gradient).  Every name below is one entry of :data:`ESTIMATORS`; ``[train] elbo`` / :class:`~ppl_models.infer.
engine.Trainer` (``elbo=``, through :func:`make_elbo`) and ``[compare] estimators`` (through
:func:`make_estimator`) resolve names through it, and an unknown name is one error listing them all.

=================================  ==========  ==========================================================
name                               objective   gradient rule (the Pyro ELBO that runs it)
=================================  ==========  ==========================================================
``Trace_ELBO``                     ELBO        Pyro's: pathwise where the guide site has ``rsample``,
                                               score-function otherwise (``Trace_ELBO``)
``TraceGraph_ELBO``                ELBO        as above, with Rao-Blackwellized score-function terms and
                                               the baselines sites ask for (``TraceGraph_ELBO``)
``TraceMeanField_ELBO``            ELBO        as ``Trace_ELBO``, with :math:`\mathrm{KL}(q \| p)` in closed form
                                               where it is known (``TraceMeanField_ELBO``)
``TraceEnum_ELBO``                 ELBO        sums out sites marked for enumeration (``TraceEnum_ELBO``)
``RenyiELBO``                      Rényi α     Pyro's ``RenyiELBO`` (``alpha``, default 0); see below
``IWAE``, ``iwae``                 IWAE-K      pathwise, :math:`K` = ``num_particles`` draws per datapoint
                                               (:class:`IWAE_ELBO`; Burda et al. 2016)
``reparameterized``                ELBO        pathwise only: :math:`z = g_\phi(\epsilon)` (``Trace_ELBO``;
                                               Kingma & Welling 2014, Rezende et al. 2014)
``score-function``                 ELBO        REINFORCE at every guide site, the draws detached
                                               (``TraceGraph_ELBO``; Williams 1992, Ranganath et al. 2014)
``score-function-avg-baseline``    ELBO        as above minus a decaying average of the downstream cost
``score-function-nn-baseline``     ELBO        as above minus :math:`b_\psi(x_i)`, an MLP of the datapoint
                                               (Mnih & Gregor 2014)
``analytic-kl``                    ELBO        pathwise, with every :math:`\mathrm{KL}(q \| p)` in closed form
                                               (``TraceMeanField_ELBO``)
``sticking-the-landing``           ELBO        pathwise, :math:`\log q_\phi(z)` at stopped-gradient parameters
                                               (``Trace_ELBO``; Roeder, Wu & Duvenaud 2017)
=================================  ==========  ==========================================================

The Pyro names keep Pyro's own behaviour.  The package's names (lower case) check, on their first call, that
the model and guide allow their rule, and otherwise raise one
:class:`~ppl_models.infer.estimators.EstimatorError` naming the site and why: a pathwise rule and a guide site
without ``rsample`` (a discrete latent), ``analytic-kl`` and a site pair whose KL is unknown, a baseline or
IWAE and a model that sums out (enumerates) a site, the neural baseline and a global latent.  Where the model
enumerates a site, ``reparameterized``, ``score-function`` and ``sticking-the-landing`` run on
``TraceEnum_ELBO``.  All names work in both ``fit`` and ``compare``; the rules' machinery is in
:mod:`ppl_models.infer.estimators`.

**IWAE and RenyiELBO under subsampling.**  With a data plate subsampled to a batch :math:`B` of :math:`N`
datapoints (scale :math:`N/B`), :class:`IWAE_ELBO` ("IWAE") optimizes

.. math:: \frac{N}{B} \sum_{i \in B} \log \frac1K \sum_{k=1}^K w_{ik},
          \qquad w_{ik} = \frac{p(x_i, z_{ik})}{q(z_{ik} \mid x_i)},

an unbiased minibatch estimate of the full-data bound :math:`\sum_{i=1}^N \log \frac1K \sum_k w_{ik}`.
Pyro's ``RenyiELBO`` (``alpha=0``) applies the plate's scale to each log weight *inside* the log-sum-exp and
so optimizes :math:`\sum_{i \in B} \log \frac1K \sum_k w_{ik}^{N/B}`, which equals the above only when
:math:`N = B` or the weights do not vary with :math:`k` (and is biased otherwise, more so as :math:`N/B`
grows).  Without subsampling both compute the same bound.

References:
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders.
    Williams (1992); Mnih & Gregor (2014); Ranganath, Gerrish & Blei (2014); Roeder, Wu & Duvenaud (2017).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import pyro.infer as infer
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import torch_item
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan
from torch import nn

from ppl_models.infer.estimators import (
    Estimator,
    EstimatorError,
    Structure,
    check_applies,
    data_plate_frame,
    inspect_sites,
    neural_baseline_for,
    site_plates,
    view_guide,
)
from ppl_models.registry import UnknownNameError

__all__ = [
    "ESTIMATORS",
    "ESTIMATOR_NAMES",
    "GRADIENT_ESTIMATORS",
    "EstimatorSpec",
    "EstimatorELBO",
    "IWAE_ELBO",
    "estimator_spec",
    "make_elbo",
    "make_estimator",
]


# ---------------------------------------------------------------------------------------------------------
# The IWAE objective
# ---------------------------------------------------------------------------------------------------------


class IWAE_ELBO(infer.ELBO):
    r"""The importance-weighted bound with the data plate's scale outside the log-sum-exp (module docstring):
    ``loss`` :math:`= -\frac{N}{B} \sum_{i} \big[\operatorname{logsumexp}_k \log w_{ik} - \log K\big]`.

    Per particle and datapoint, :math:`\log w_{ik}` sums every model site's log-density minus every guide
    site's over all dimensions but the particles' and the data plate's, each site scaled by its own scale
    without the plate's :math:`N/B` (a KL weight of ``poutine.scale`` stays inside) and masked as Pyro masks it;
    a scale common to every site (``poutine.scale`` around model and guide, e.g. a data-parallel rank's share of
    the batch) weighs the bound outside the log-sum-exp, as :math:`N/B` does.
    The data plate is the plate that subsamples; without subsampling, the outermost plate every site lies in
    (a sum of per-datapoint bounds), and with no such plate the whole batch is one datapoint (the joint bound,
    e.g. with global latents).  The gradient is pathwise: every guide site must have ``rsample``.

    Refused, with an :class:`~ppl_models.infer.estimators.EstimatorError` naming the site: a site outside a
    subsampled data plate (a global latent, or a global observation: the bound of the whole data set does not
    factorize over minibatches), two subsampled plates, a guide site without ``rsample``, a model latent the
    guide does not sample (enumerated or missing).

    :param num_particles: :math:`K`, importance samples per datapoint.
    :param max_plate_nesting: the model's plate depth (guessed by Pyro when left infinite).
    :param vectorize_particles: draw the :math:`K` particles in one vectorized pass (a plate) or in a loop.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: float = float("inf"),
                 vectorize_particles: bool = True, strict_enumeration_warning: bool = True,
                 ignore_jit_warnings: bool = False):
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=vectorize_particles,
                         strict_enumeration_warning=strict_enumeration_warning,
                         ignore_jit_warnings=ignore_jit_warnings)

    def _get_trace(self, model, guide, args, kwargs):
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def log_weights(self, model_trace, guide_trace):
        r"""``(log_w, scale)``: :math:`\log w_{ik}` of one pair of traces, shape ``(K, B)`` (``(1, B)`` for a
        trace of one particle; ``B = 1`` without a data plate), and the bound's scale: the data plate's
        :math:`N/B` times a scale common to every site (``poutine.scale`` around model and guide)."""
        guide_sites = [(n, s) for n, s in guide_trace.nodes.items()
                       if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
        model_sites = [(n, s) for n, s in model_trace.nodes.items()
                       if s["type"] == "sample" and not site_is_subsample(s)]
        for name, site in guide_sites:
            if site["infer"].get("enumerate"):
                raise EstimatorError(f"IWAE_ELBO: guide site {name!r} is enumerated; IWAE_ELBO draws every latent")
            if not site["fn"].has_rsample:
                raise EstimatorError(
                    f"IWAE_ELBO: guide site {name!r} ({type(site['fn']).__name__}) has no reparameterized sampler, "
                    "and the IWAE gradient here is pathwise; use a score-function estimator of the ELBO "
                    "(e.g. 'score-function') for this guide"
                )
        for name, site in model_sites:
            if not site["is_observed"] and name not in guide_trace.nodes:
                raise EstimatorError(
                    f"IWAE_ELBO: model latent site {name!r} is not sampled by the guide (summed out or missing); "
                    "IWAE_ELBO cannot sum out a site"
                )
        sites = model_sites + guide_sites
        frame = data_plate_frame(s for _, s in sites)
        scale = 1.0
        if frame is not None and frame.full_size is not None and frame.full_size != frame.size:
            scale = frame.full_size / frame.size
            for name, site in sites:
                plates = site_plates(site)
                other = [f.name for f in plates
                         if f.name != frame.name and f.full_size is not None and f.full_size != f.size]
                if other:
                    raise EstimatorError(
                        f"IWAE_ELBO: plates {frame.name!r} and {other[0]!r} both subsample (site {name!r}); the "
                        "IWAE bound is scaled by one data plate's N/B"
                    )
                if all(f.name != frame.name for f in plates):
                    kind = "observed" if site["is_observed"] else "latent"
                    raise EstimatorError(
                        f"IWAE_ELBO: {kind} site {name!r} lies outside the subsampled data plate {frame.name!r} "
                        "(a global site): the IWAE bound of the whole data set does not factorize over "
                        "datapoints, so a minibatch cannot estimate it; train on the full data set as one batch, "
                        "or use an ELBO (e.g. Trace_ELBO)"
                    )
        # a scale common to every site (poutine.scale around model and guide: a data-parallel rank's share of
        # the batch) weighs the whole bound, like the plate's N/B: it goes outside the log-sum-exp too
        inner = [site["scale"] / scale for _, site in sites]
        if inner and all(isinstance(v, (int, float)) and v == inner[0] for v in inner):
            scale = scale * inner[0]
        vectorized = self.vectorize_particles and self.num_particles > 1
        particle_dim = -int(self.max_plate_nesting) if vectorized else None
        data_dim = None if frame is None else frame.dim
        keep = [d for d in (particle_dim, data_dim) if d is not None]
        log_w = 0.0
        for sign, group in ((1.0, model_sites), (-1.0, guide_sites)):
            for _, site in group:
                site_scale = site["scale"] / scale if scale != 0 else 0.0
                log_p = scale_and_mask(site["unscaled_log_prob"], site_scale, site["mask"])
                log_w = log_w + sign * _per_datapoint(torch.as_tensor(log_p), keep, particle_dim, data_dim)
        if not isinstance(log_w, torch.Tensor):
            raise EstimatorError("IWAE_ELBO: model and guide have no sample site")
        return log_w, scale

    def surrogate_loss(self, traces) -> torch.Tensor:
        """The differentiable loss of the pairs of traces ``traces`` (those of :meth:`_get_traces`)."""
        pieces, scale = [], 1.0
        for model_trace, guide_trace in traces:
            log_w, scale = self.log_weights(model_trace, guide_trace)
            pieces.append(log_w)
        log_w = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)  # (K, B)
        bound = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])  # (B,): per datapoint
        return -(bound.sum() * scale)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        loss = self.surrogate_loss(self._get_traces(model, guide, args, kwargs))
        warn_if_nan(loss, "loss")
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)


def _per_datapoint(log_p: torch.Tensor, keep, particle_dim, data_dim) -> torch.Tensor:
    """``log_p`` summed over every dimension but ``keep`` (the particles' and the data plate's), as ``(K, B)``
    (size 1 where ``log_p`` broadcasts)."""
    need = max([-d for d in keep] + [log_p.dim()])
    log_p = log_p.reshape((1,) * (need - log_p.dim()) + tuple(log_p.shape))
    dims = [d for d in range(-log_p.dim(), 0) if d not in keep]
    if dims:
        log_p = log_p.sum(dims, keepdim=True)
    num_k = log_p.shape[particle_dim] if particle_dim is not None else 1
    num_b = log_p.shape[data_dim] if data_dim is not None else 1
    return log_p.reshape(num_k, num_b)


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EstimatorSpec:
    """One name of the vocabulary: its objective and gradient rule (module docstring).

    :param objective: ``"ELBO"``, ``"IWAE"`` or ``"RenyiELBO"``.
    :param elbo: the Pyro ELBO (or :class:`IWAE_ELBO`) that computes it.
    :param rule: ``"pyro"`` (the ELBO's own), ``"pathwise"``, ``"score-function"`` or ``"sticking-the-landing"``.
    :param baseline: ``None``, ``"decaying-average"`` or ``"neural"`` (score-function rules).
    :param analytic_kl: every guide site needs a closed-form KL to the model's site.
    """

    name: str
    objective: str
    elbo: type
    rule: str
    baseline: Optional[str] = None
    analytic_kl: bool = False

    @property
    def enumerates(self) -> bool:
        """Whether it can sum out a model site marked for parallel enumeration (on ``TraceEnum_ELBO``)."""
        if self.rule == "pyro":
            return self.elbo is infer.TraceEnum_ELBO
        return self.objective == "ELBO" and self.baseline is None and not self.analytic_kl

    @property
    def package_rule(self) -> bool:
        """Whether the package applies the rule (:class:`EstimatorELBO`) rather than a Pyro ELBO as it is."""
        return self.rule != "pyro" and self.elbo is not IWAE_ELBO


def _table(*specs: EstimatorSpec) -> Dict[str, EstimatorSpec]:
    return {s.name: s for s in specs}


#: Every name of the vocabulary (module docstring), in the table's order.
ESTIMATORS: Dict[str, EstimatorSpec] = _table(
    EstimatorSpec("Trace_ELBO", "ELBO", infer.Trace_ELBO, "pyro"),
    EstimatorSpec("TraceGraph_ELBO", "ELBO", infer.TraceGraph_ELBO, "pyro"),
    EstimatorSpec("TraceMeanField_ELBO", "ELBO", infer.TraceMeanField_ELBO, "pyro"),
    EstimatorSpec("TraceEnum_ELBO", "ELBO", infer.TraceEnum_ELBO, "pyro"),
    EstimatorSpec("RenyiELBO", "RenyiELBO", infer.RenyiELBO, "pyro"),
    EstimatorSpec("IWAE", "IWAE", IWAE_ELBO, "pathwise"),
    EstimatorSpec("reparameterized", "ELBO", infer.Trace_ELBO, "pathwise"),
    EstimatorSpec("score-function", "ELBO", infer.TraceGraph_ELBO, "score-function"),
    EstimatorSpec("score-function-avg-baseline", "ELBO", infer.TraceGraph_ELBO, "score-function",
                  baseline="decaying-average"),
    EstimatorSpec("score-function-nn-baseline", "ELBO", infer.TraceGraph_ELBO, "score-function", baseline="neural"),
    EstimatorSpec("analytic-kl", "ELBO", infer.TraceMeanField_ELBO, "pathwise", analytic_kl=True),
    EstimatorSpec("iwae", "IWAE", IWAE_ELBO, "pathwise"),
    EstimatorSpec("sticking-the-landing", "ELBO", infer.Trace_ELBO, "sticking-the-landing"),
)
ESTIMATOR_NAMES = tuple(ESTIMATORS)
#: The package's gradient estimators of the ELBO (and IWAE): what ``compare`` compares unless told otherwise.
GRADIENT_ESTIMATORS = ("reparameterized", "score-function", "score-function-avg-baseline",
                       "score-function-nn-baseline", "analytic-kl", "iwae", "sticking-the-landing")
#: Names that can sum out an enumerated model site.
_ENUMERATING = tuple(n for n, s in ESTIMATORS.items() if s.enumerates)


def estimator_spec(name: str) -> EstimatorSpec:
    """The entry of ``name``; an unknown name is one :class:`~ppl_models.registry.UnknownNameError` listing all."""
    if name not in ESTIMATORS:
        raise UnknownNameError("estimator", name, ESTIMATOR_NAMES)
    return ESTIMATORS[name]


# ---------------------------------------------------------------------------------------------------------
# The package's rules on Pyro's ELBOs
# ---------------------------------------------------------------------------------------------------------


class EstimatorELBO(infer.ELBO):
    """A Pyro ELBO run with the package's gradient rule ``spec`` (``reparameterized``, ``score-function`` and
    its baselines, ``analytic-kl``, ``sticking-the-landing``).

    On its first call (:meth:`prepare`) it traces model and guide once, checks that the rule applies
    (:func:`~ppl_models.infer.estimators.check_applies`: an error naming the site otherwise), builds the Pyro
    ELBO (``TraceEnum_ELBO`` when the model sums out a site) with the plate depth it found, and the neural
    baseline; every call then runs that ELBO on the guide as the rule sees it (:meth:`guide_for`).
    """

    def __init__(self, spec: EstimatorSpec, *, num_particles: int = 1, max_plate_nesting: float = float("inf"),
                 vectorize_particles: bool = True, baseline_beta: float = 0.9,
                 baseline_hidden: Sequence[int] = (64,), data_plate: Optional[str] = None):
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=vectorize_particles)
        self.spec, self.baseline_beta, self.baseline_hidden = spec, baseline_beta, tuple(baseline_hidden)
        self.data_plate = data_plate
        self.inner: Optional[infer.ELBO] = None
        self.structure: Optional[Structure] = None
        self.modules: Dict[str, nn.Module] = {}
        self._batch: Optional[int] = None  # the decaying-average baseline's batch size

    def prepare(self, model, guide, args: tuple, kwargs: dict, structure: Optional[Structure] = None) -> None:
        """Check the rule against model and guide (once) and build the ELBO that runs it."""
        if self.inner is not None:
            return
        name = self.spec.name
        if structure is None:
            structure = inspect_sites(model, guide, args, kwargs, self.data_plate)
        check_applies(self.spec, structure, self.num_particles, _ENUMERATING)
        if self.spec.baseline == "decaying-average":
            self._batch = _batch_size(args)
            num_data = kwargs.get("num_data")
            if num_data is not None and self._batch and num_data % self._batch:
                raise EstimatorError(
                    f"estimator {name!r}: its average baseline has one entry per position in the batch, so every "
                    f"batch must have the same size: num_data={num_data} is not a multiple of "
                    f"batch_size={self._batch}"
                )
        if self.spec.baseline == "neural":
            self.modules["nn_baseline"] = neural_baseline_for(name, args, self.baseline_hidden)
        if self.spec.rule == "sticking-the-landing":  # fail now, naming the site, if a site cannot be detached
            inspect_sites(model, self.guide_for(guide), args, kwargs, self.data_plate)
        vectorize = self.vectorize_particles and self.num_particles > 1
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = structure.plate_depth + int(vectorize)
        cls = infer.TraceEnum_ELBO if structure.enumerated else self.spec.elbo
        inner = cls(num_particles=self.num_particles, vectorize_particles=self.vectorize_particles)
        inner.max_plate_nesting = self.max_plate_nesting
        self.structure, self.inner = structure, inner

    def guide_for(self, guide, baseline: bool = True):
        """``guide`` as the rule runs it (:func:`~ppl_models.infer.estimators.view_guide`); ``baseline=False``:
        without the baseline (a loss without gradients does not use it)."""
        return view_guide(guide, self.spec.rule, baseline=self.spec.baseline if baseline else None,
                          baseline_beta=self.baseline_beta, neural_baseline=self.modules.get("nn_baseline"))

    def _ready(self, model, guide, args, kwargs, grads: bool = True):
        self.prepare(model, guide, args, kwargs)
        if not grads:
            return self.guide_for(guide, baseline=False)
        if self._batch is not None and _batch_size(args) != self._batch:
            raise EstimatorError(
                f"estimator {self.spec.name!r}: its average baseline has one entry per position in the batch, so "
                f"every batch must have the same size: received a batch of {_batch_size(args)} after batches of "
                f"{self._batch} (make the data set's size a multiple of the batch size)"
            )
        return self.guide_for(guide)

    def _get_trace(self, model, guide, args, kwargs):
        return self.inner._get_trace(model, self._ready(model, guide, args, kwargs), args, kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        guide = self._ready(model, guide, args, kwargs, grads=False)
        return self.inner.loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        guide = self._ready(model, guide, args, kwargs)
        return self.inner.loss_and_grads(model, guide, *args, **kwargs)


class _DifferentiableEstimatorELBO(EstimatorELBO):
    """:class:`EstimatorELBO` on an ELBO with ``differentiable_loss`` (all but ``TraceGraph_ELBO``)."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        guide = self._ready(model, guide, args, kwargs)
        return self.inner.differentiable_loss(model, guide, *args, **kwargs)


def _batch_size(args: tuple) -> Optional[int]:
    x = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 1), None)
    return None if x is None else int(x.shape[0])


# ---------------------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------------------


def _check_num_particles(spec: EstimatorSpec, num_particles) -> None:
    if isinstance(num_particles, int) and not isinstance(num_particles, bool) and num_particles >= 1:
        return
    if spec.objective == "IWAE":
        raise EstimatorError(
            f"estimator {spec.name!r}: num_particles (K, the number of importance samples) must be an integer "
            f">= 1, received {num_particles!r}; the IWAE bound averages K >= 1 importance weights"
        )
    raise EstimatorError(f"estimator {spec.name!r}: num_particles must be an integer >= 1, received {num_particles!r}")


def make_elbo(
    name: str,
    *,
    num_particles: int = 1,
    vectorize_particles: bool = True,
    max_plate_nesting: int | None = None,
    alpha: float | None = None,
    baseline_beta: float = 0.9,
    baseline_hidden: Sequence[int] = (64,),
    data_plate: Optional[str] = None,
) -> infer.ELBO:
    """The objective object of the name ``name`` (:data:`ESTIMATORS`), to call as a Pyro ELBO with any model and
    guide: a Pyro ELBO for Pyro's names, :class:`IWAE_ELBO` for ``IWAE``/``iwae``, an :class:`EstimatorELBO`
    for the package's other rules (checked against model and guide on its first call).

    :param num_particles: Monte Carlo samples per step (the number of importance samples ``K`` for IWAE).
    :param vectorize_particles: draw the particles in one vectorized pass (a plate) rather than a loop.
    :param max_plate_nesting: the model's plate depth (found from the first call when ``None``).
    :param alpha: the Rényi α, only for ``RenyiELBO`` (default 0).
    :param baseline_beta: decay of ``score-function-avg-baseline``.
    :param baseline_hidden: hidden sizes of the neural baseline.
    :param data_plate: the name of the plate over datapoints (``None``: found from the traces).
    """
    spec = estimator_spec(name)
    _check_num_particles(spec, num_particles)
    kwargs = dict(num_particles=num_particles, vectorize_particles=vectorize_particles)
    if max_plate_nesting is not None:
        kwargs["max_plate_nesting"] = max_plate_nesting
    if alpha is not None and spec.elbo is not infer.RenyiELBO:
        raise ValueError(f"alpha applies only to RenyiELBO, not to {name} (IWAE is the bound of alpha = 0)")
    if spec.elbo is infer.RenyiELBO:
        return infer.RenyiELBO(alpha=0.0 if alpha is None else float(alpha), **kwargs)
    if not spec.package_rule:
        return spec.elbo(**kwargs)
    cls = _DifferentiableEstimatorELBO if hasattr(spec.elbo, "differentiable_loss") else EstimatorELBO
    return cls(spec, baseline_beta=baseline_beta, baseline_hidden=baseline_hidden, data_plate=data_plate, **kwargs)


def make_estimator(
    name: str,
    model,
    guide,
    args: tuple,
    kwargs: dict | None = None,
    *,
    num_particles: int = 1,
    data_plate: str = "data",
    baseline_beta: float = 0.9,
    baseline_hidden: Sequence[int] = (64,),
    vectorize_particles: bool = True,
    alpha: float | None = None,
) -> Estimator:
    """The estimator ``name`` (:data:`ESTIMATORS`) bound to ``model`` and ``guide``, checked now.

    :param args: example arguments of model and guide (their structure is traced once to check that the
        estimator applies; e.g. ``(x, idx)``).
    :param kwargs: example keyword arguments (e.g. ``{"num_data": N}``).
    :param num_particles: draws per estimate (``K`` of ``iwae``); score-function estimators with a baseline
        take one draw at a time (their baselines are per draw).
    :param data_plate: the name of the data plate (the neural baseline predicts a cost per datapoint in it).
    :raises EstimatorError: naming the site and why the estimator cannot apply.
    """
    spec = estimator_spec(name)
    objective = make_elbo(name, num_particles=num_particles, vectorize_particles=vectorize_particles, alpha=alpha,
                          baseline_beta=baseline_beta, baseline_hidden=baseline_hidden, data_plate=data_plate)
    kwargs = dict(kwargs or {})
    structure = inspect_sites(model, guide, args, kwargs, data_plate)
    if not structure.guide_sites:
        raise EstimatorError(f"estimator {name!r}: the guide samples no latent site: there is nothing to estimate")
    if isinstance(objective, EstimatorELBO):
        objective.prepare(model, guide, args, kwargs, structure)  # checks the rule
        elbo, modules = objective.inner, dict(objective.modules)
    else:
        check_applies(spec, structure, num_particles, _ENUMERATING)
        objective.max_plate_nesting = structure.plate_depth + int(vectorize_particles and num_particles > 1)
        elbo, modules = objective, {}
    if spec.objective == "IWAE":
        target = f"IWAE-{num_particles}"
    elif spec.objective == "RenyiELBO":
        target = f"RenyiELBO(alpha={objective.alpha:g})-{num_particles}"
    else:
        target = "ELBO"
    return Estimator(name, model, guide, objective, elbo, num_particles, target, structure, modules)
