r"""Gradient rules of the estimators, and the checks that say when a rule cannot apply to a model and guide.

The names — which objective, with which gradient rule — are one table in :mod:`ppl_models.infer.objectives`
(:data:`~ppl_models.infer.objectives.ESTIMATORS`); this module holds what the rules need:

* **views of the guide** (:class:`EstimatorView`, applied by a messenger around the guide): a score-function
  rule samples without a gradient path, so Pyro's ELBOs add the score term
  :math:`(\log p(x, z) - \log q(z))\, \nabla_\phi \log q_\phi(z)` (Williams 1992, Ranganath et al. 2014);
  sticking-the-landing scores :math:`\log q_\phi(z)` at stopped-gradient parameters, which drops the score term
  :math:`\nabla_\phi \log q_\phi(z)|_z` (zero in expectation; Roeder, Wu & Duvenaud 2017);
* **baselines** for the score function: a decaying average of the downstream cost
  (``infer={"baseline": {"use_decaying_avg_baseline": True}}``) or :math:`b_\psi(x_i)`, an MLP of the datapoint
  trained to predict it (:class:`NeuralBaseline`; Mnih & Gregor 2014), attached with ``poutine.infer_config``;
* **structure** (:func:`inspect_sites`): the guide's latent sites — reparameterizable, discrete, inside the
  data plate, with a closed-form KL to the model's site — and the model's enumerated sites, from one trace that
  touches no generator;
* **checks** (:func:`check_applies`): one :class:`EstimatorError` naming the site and why, e.g. a pathwise rule
  and a guide site with no reparameterized sampler (a discrete latent), a closed-form KL that
  ``kl_divergence`` does not know, a baseline when the model sums out (enumerates) a site, because only
  ``TraceGraph_ELBO`` has baselines and it cannot enumerate.

Model and guide functions are never modified: views and baselines wrap the guide when the objective runs it.

References:
    Williams (1992), Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement Learning.
    Mnih & Gregor (2014), Neural Variational Inference and Learning in Belief Networks.
    Ranganath, Gerrish & Blei (2014), Black Box Variational Inference.
    Roeder, Wu & Duvenaud (2017), Sticking the Landing: Simple, Lower-Variance Gradient Estimators for VI.
    Mohamed, Rosca, Figurnov & Mnih (2020), Monte Carlo Gradient Estimation in Machine Learning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import pyro
import pyro.distributions as dist
import pyro.infer as infer
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import kl_divergence

__all__ = [
    "PARTICLE_PLATE",
    "Estimator",
    "EstimatorError",
    "EstimatorView",
    "NeuralBaseline",
    "SiteInfo",
    "Structure",
    "check_applies",
    "data_plate_frame",
    "inspect_sites",
    "neural_baseline_for",
    "site_plates",
    "trace_plate_depth",
    "view_guide",
]

#: The name of the plate Pyro's ELBOs draw vectorized particles in.
PARTICLE_PLATE = "num_particles_vectorized"


class EstimatorError(ValueError):
    """An estimator that cannot apply to this model and guide; the message names the site and why."""


# ---------------------------------------------------------------------------------------------------------
# The guide's sites as a gradient rule sees them
# ---------------------------------------------------------------------------------------------------------


def _detach_dist(fn, site: str):
    """The same distribution with every parameter detached (for sticking-the-landing's ``log q``)."""
    if isinstance(fn, torch.distributions.Independent):
        return dist.Independent(_detach_dist(fn.base_dist, site), fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.MultivariateNormal):
        return dist.MultivariateNormal(fn.loc.detach(), scale_tril=fn.scale_tril.detach())
    if isinstance(fn, torch.distributions.TransformedDistribution):
        for t in fn.transforms:
            if any(isinstance(v, torch.Tensor) and v.requires_grad for v in vars(t).values()):
                break
        else:
            return dist.TransformedDistribution(_detach_dist(fn.base_dist, site), fn.transforms)
    elif isinstance(fn, (dist.Normal, dist.Dirichlet, dist.Gamma, dist.Beta, dist.Laplace, dist.StudentT)):
        names = [n for n in fn.arg_constraints if n in vars(fn)]
        return type(fn)(**{n: getattr(fn, n).detach() for n in names})
    raise EstimatorError(
        f"estimator 'sticking-the-landing': guide site {site!r}: cannot stop the gradient through the parameters "
        f"of a {type(fn).__name__} (supported: Normal, MultivariateNormal, Dirichlet, Gamma, Beta, Laplace, "
        "StudentT, Independent and parameter-free transforms of them)"
    )


class EstimatorView(dist.TorchDistribution):
    """A guide site's distribution as an estimator sees it: ``rsample`` from ``base``, ``log_prob`` from
    ``scoring``, and a switch for whether draws carry a gradient path.

    * score-function: ``reparameterized=False`` (draws are detached; Pyro's ELBOs then add score terms);
    * sticking-the-landing: ``scoring`` = ``base`` with detached parameters.

    Unlike ``has_rsample_``, the switch survives ``expand`` (plates outside the guide, vectorized particles).
    """

    arg_constraints: dict = {}

    def __init__(self, base, *, reparameterized: bool, scoring=None):
        self.base, self.scoring = base, scoring if scoring is not None else base
        self._reparameterized = bool(reparameterized) and base.has_rsample
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def has_rsample(self):
        return self._reparameterized

    @property
    def support(self):
        return self.base.support

    @property
    def has_enumerate_support(self):
        return self.base.has_enumerate_support

    def enumerate_support(self, expand=True):
        return self.base.enumerate_support(expand)

    @property
    def mean(self):
        return self.base.mean

    @property
    def variance(self):
        return self.base.variance

    def sample(self, sample_shape=torch.Size()):
        return self.base.sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self.base.rsample(sample_shape)

    def log_prob(self, value):
        return self.scoring.log_prob(value)

    def entropy(self):
        return self.scoring.entropy()

    def expand(self, batch_shape, _instance=None):
        scoring = None if self.scoring is self.base else self.scoring.expand(batch_shape)
        return EstimatorView(self.base.expand(batch_shape), reparameterized=self._reparameterized, scoring=scoring)


class _GuideView(Messenger):
    """Replace every latent sample site's ``fn`` of the guide by an :class:`EstimatorView`."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode  # "score-function" or "sticking-the-landing"

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg) or msg["value"] is not None:
            return
        fn = msg["fn"]
        if self.mode == "score-function":
            msg["fn"] = EstimatorView(fn, reparameterized=False)
        else:
            msg["fn"] = EstimatorView(fn, reparameterized=True, scoring=_detach_dist(fn, msg["name"]))


# ---------------------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteInfo:
    """One latent site of the guide (or an enumerated site of the model)."""

    name: str
    fn_name: str
    reparameterizable: bool
    discrete: bool
    in_data_plate: bool
    kl_known: bool


@dataclass(frozen=True)
class Structure:
    guide_sites: tuple  # SiteInfo of the guide's latent sites
    enumerated: tuple  # model sites summed out (enumerated) and not sampled by the guide
    plate_depth: int
    data_plate: Optional[str] = None  # the plate over datapoints (given, or found by data_plate_frame)


def _is_latent(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def _base_name(fn) -> str:
    while isinstance(fn, (torch.distributions.Independent, EstimatorView)):
        fn = fn.base_dist if isinstance(fn, torch.distributions.Independent) else fn.base
    return type(fn).__name__


def trace_plate_depth(*traces) -> int:
    """How many vectorized plates the sample sites of ``traces`` nest (0: none)."""
    dims = [
        frame.dim
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def site_plates(site) -> list:
    """The vectorized plates of a trace site, outermost first, without Pyro's particle plate."""
    return [f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE]


def data_plate_frame(sites) -> Optional[object]:
    """The plate over datapoints of ``sites`` (sample sites of traces, subsample sites excluded): the outermost
    plate that subsamples (``full_size != size``: its sites are scaled by ``N / B``) if there is one, else the
    outermost plate that every site lies in; ``None`` when no plate is shared by every site."""
    sites = list(sites)
    for site in sites:
        for frame in site_plates(site):
            if frame.full_size is not None and frame.full_size != frame.size:
                return frame
    common = None
    for site in sites:
        keys = {(f.name, f.dim) for f in site_plates(site)}
        common = [f for f in (site_plates(site) if common is None else common) if (f.name, f.dim) in keys]
    return common[0] if common else None


def inspect_sites(model: Callable, guide: Callable, args: tuple, kwargs: dict,
                  data_plate: Optional[str] = "data") -> Structure:
    """Trace guide and (replayed) model once, without touching any generator or parameter gradient.

    :param data_plate: the name of the plate over datapoints; ``None``: found from the traces
        (:func:`data_plate_frame`).
    """
    with torch.no_grad(), torch.random.fork_rng(devices=[]), poutine.block(), pyro.validation_enabled(False):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    if data_plate is None:
        frame = data_plate_frame(
            site for trace in (model_trace, guide_trace) for site in trace.nodes.values()
            if site["type"] == "sample" and not site_is_subsample(site)
        )
        data_plate = None if frame is None else frame.name
    sites = []
    for name, site in guide_trace.nodes.items():
        if not _is_latent(site):
            continue
        fn = site["fn"]
        model_site = model_trace.nodes.get(name)
        kl_known = False
        if model_site is not None:
            try:
                kl_divergence(fn, model_site["fn"])
                kl_known = True
            except NotImplementedError:
                kl_known = False
        sites.append(
            SiteInfo(
                name,
                _base_name(fn),
                bool(fn.has_rsample),
                bool(fn.support.is_discrete),
                data_plate is not None and any(f.name == data_plate for f in site["cond_indep_stack"]),
                kl_known,
            )
        )
    enumerated = tuple(
        name
        for name, site in model_trace.nodes.items()
        if _is_latent(site) and name not in guide_trace.nodes and site["infer"].get("enumerate") == "parallel"
    )
    return Structure(tuple(sites), enumerated, trace_plate_depth(guide_trace, model_trace), data_plate)


# ---------------------------------------------------------------------------------------------------------
# Checks: when a rule cannot apply
# ---------------------------------------------------------------------------------------------------------


def check_applies(spec, structure: Structure, num_particles: int, enumerating: Sequence[str]) -> None:
    """Raise :class:`EstimatorError`, naming the site and why, when the estimator ``spec`` (an entry of
    :data:`ppl_models.infer.objectives.ESTIMATORS`) cannot apply to a model and guide of this ``structure``.

    :param enumerating: the names of the estimators that can sum out an enumerated model site (for the message).
    """
    name = spec.name
    if spec.rule in ("pathwise", "sticking-the-landing"):
        for s in structure.guide_sites:
            if not s.reparameterizable:
                why = "a discrete latent" if s.discrete else "its distribution has no rsample"
                raise EstimatorError(
                    f"estimator {name!r}: guide site {s.name!r} ({s.fn_name}) has no reparameterized sampler "
                    f"({why}), so there is no pathwise gradient through it; use 'score-function' "
                    "(or a baseline variant) for this guide"
                )
    if structure.enumerated and not spec.enumerates:
        if spec.baseline is not None:
            why = "baselines exist only in TraceGraph_ELBO, which cannot sum out a site"
        else:
            why = f"{spec.elbo.__name__} cannot sum out a site"
        raise EstimatorError(
            f"estimator {name!r}: the model enumerates site {structure.enumerated[0]!r} "
            f"(infer={{'enumerate': 'parallel'}}, summed out, not sampled by the guide); {why}; "
            f"estimators that apply: {', '.join(enumerating)}"
        )
    if spec.analytic_kl:
        for s in structure.guide_sites:
            if not s.kl_known:
                raise EstimatorError(
                    f"estimator {name!r}: guide site {s.name!r} ({s.fn_name}): no closed-form KL to the "
                    "model's distribution at that site is registered with torch.distributions.kl_divergence "
                    "(or the site is auxiliary); use 'reparameterized'"
                )
    if spec.baseline is not None and num_particles != 1:
        raise EstimatorError(
            f"estimator {name!r}: baselines are per draw: num_particles must be 1, received {num_particles}"
        )
    if spec.baseline == "neural":
        outside = [s.name for s in structure.guide_sites if not s.in_data_plate]
        if outside:
            plate = repr(structure.data_plate) if structure.data_plate else "over datapoints (there is none)"
            raise EstimatorError(
                f"estimator {name!r}: guide site {outside[0]!r} lies outside the data plate {plate}; the neural "
                "baseline predicts each datapoint's downstream cost from x_i, so it applies to local latents only; "
                "use 'score-function-avg-baseline'"
            )


# ---------------------------------------------------------------------------------------------------------
# Neural baseline
# ---------------------------------------------------------------------------------------------------------


class NeuralBaseline(nn.Module):
    r""":math:`b_\psi(x_i)`: an MLP from a flattened datapoint ``(batch, x_numel)`` to its predicted downstream
    cost ``(batch,)``; Pyro's ``TraceGraph_ELBO`` trains it by least squares on the observed costs.

    :param x_numel: size of one flattened datapoint.
    :param hidden_dims: hidden layer sizes (ReLU).
    """

    def __init__(self, x_numel: int, hidden_dims: Sequence[int] = (64,)):
        super().__init__()
        sizes = [x_numel, *hidden_dims, 1]
        layers: List[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i > 0:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(n_in, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1)).squeeze(-1)


def neural_baseline_for(name: str, args: tuple, hidden_dims: Sequence[int]) -> NeuralBaseline:
    """A :class:`NeuralBaseline` for the data tensor ``x = args[0]`` ``(batch, ...)`` (draws its initial weights
    from torch's global generator)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise EstimatorError(f"estimator {name!r}: the first argument must be the data tensor x")
    return NeuralBaseline(math.prod(x.shape[1:]), hidden_dims).to(dtype=x.dtype)


# ---------------------------------------------------------------------------------------------------------
# The guide as a rule runs it
# ---------------------------------------------------------------------------------------------------------


def view_guide(guide: Callable, rule: str, *, baseline: Optional[str] = None, baseline_beta: float = 0.9,
               neural_baseline: Optional[NeuralBaseline] = None) -> Callable:
    """``guide`` as the gradient ``rule`` runs it: its latent sites seen through :class:`EstimatorView`
    (``"score-function"``, ``"sticking-the-landing"``; other rules: unchanged) and the ``baseline``
    (``"decaying-average"`` with decay ``baseline_beta``, or ``"neural"``: ``neural_baseline``, registered in
    Pyro's param store as ``"nn_baseline"`` when the guide runs) attached to every latent site."""
    wrapped = guide
    if rule in ("score-function", "sticking-the-landing"):
        wrapped = _wrap_view(guide, rule)
    if baseline == "decaying-average":
        config = {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": float(baseline_beta)}}
        wrapped = poutine.infer_config(wrapped, lambda site: config if _is_latent(site) else {})
    elif baseline == "neural":
        wrapped = _wrap_nn_baseline(wrapped, neural_baseline)
    return wrapped


def _wrap_view(guide: Callable, mode: str) -> Callable:
    def wrapped(*args, **kwargs):
        with _GuideView(mode):
            return guide(*args, **kwargs)

    wrapped.__name__ = f"{getattr(guide, '__name__', 'guide')}_{mode.replace('-', '_')}"
    return wrapped


def _wrap_nn_baseline(guide: Callable, baseline: NeuralBaseline) -> Callable:
    def wrapped(x, *args, **kwargs):
        pyro.module("nn_baseline", baseline)
        config = {"baseline": {"nn_baseline": baseline, "nn_baseline_input": x}}
        return poutine.infer_config(guide, lambda site: config if _is_latent(site) else {})(x, *args, **kwargs)

    return wrapped


# ---------------------------------------------------------------------------------------------------------
# An estimator bound to a model and guide
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Estimator:
    """An estimator bound to one model and guide (:func:`ppl_models.infer.objectives.make_estimator`): call
    :meth:`loss_and_grads` as Pyro's ``ELBO.loss_and_grads`` with the model's arguments.

    ``objective`` is what runs (the ELBO of :func:`~ppl_models.infer.objectives.make_elbo`, which applies the
    rule's view of the guide); ``elbo`` the Pyro ELBO that computes it (``objective`` itself, or the ELBO inside
    it); ``modules`` holds auxiliary networks (the neural baseline), registered in Pyro's param store when the
    guide runs."""

    name: str
    model: Callable
    guide: Callable
    objective: infer.ELBO
    elbo: infer.ELBO
    num_particles: int
    target: str  # "ELBO", "IWAE-K" or "RenyiELBO(alpha=a)-K"
    structure: Structure
    modules: Dict[str, nn.Module] = field(default_factory=dict)

    def loss_and_grads(self, *args, **kwargs) -> float:
        """One estimate: accumulates gradients into the parameters, returns the loss (-ELBO estimate)."""
        return float(self.objective.loss_and_grads(self.model, self.guide, *args, **kwargs))

    def loss(self, *args, **kwargs) -> float:
        return float(self.objective.loss(self.model, self.guide, *args, **kwargs))

    def auxiliary_param_names(self) -> List[str]:
        """Names in Pyro's param store that belong to the estimator (baselines), not to model or guide."""
        store = pyro.get_param_store()
        names = [n for n in store.keys() if n.startswith("__baseline") or n.startswith("nn_baseline$$")]
        return names
