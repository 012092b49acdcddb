r"""Gradient estimators of the ELBO, chosen by name, for any model and guide.

Every estimator estimates
:math:`\nabla_{\theta,\phi}\,\mathrm{ELBO} = \nabla\, \mathbb{E}_{q_\phi(z)}[\log p_\theta(x, z) - \log q_\phi(z)]`
(IWAE: the gradient of the IWAE bound) from draws of the guide; they differ in how the draws enter the gradient:

==============================  ===========================================================================
name                            gradient of the guide's parameters
==============================  ===========================================================================
``reparameterized``             pathwise: :math:`z = g_\phi(\epsilon)`, differentiate through the draw
                                (``Trace_ELBO``; Kingma & Welling 2014, Rezende et al. 2014)
``score-function``              REINFORCE: :math:`(\log p(x, z) - \log q(z))\, \nabla_\phi \log q_\phi(z)` with
                                the draw detached (``TraceGraph_ELBO`` with every guide site's
                                reparameterization switched off; Williams 1992, Ranganath et al. 2014);
                                ``TraceGraph_ELBO`` keeps only each site's downstream cost
``score-function-avg-baseline`` as above minus a decaying average of the downstream cost
                                (``infer={"baseline": {"use_decaying_avg_baseline": True}}``)
``score-function-nn-baseline``  as above minus :math:`b_\psi(x_i)`, an MLP of the datapoint trained to predict
                                its downstream cost (``nn_baseline``; Mnih & Gregor 2014)
``analytic-kl``                 pathwise, with :math:`\mathrm{KL}(q \| p)` in closed form where
                                ``kl_divergence`` knows the pair (``TraceMeanField_ELBO``)
``iwae``                        pathwise gradient of the IWAE bound with ``K = num_particles`` draws
                                (``RenyiELBO(alpha=0)``; Burda et al. 2016)
``sticking-the-landing``        pathwise, with :math:`\log q_\phi(z)` evaluated at stopped-gradient parameters:
                                the score term :math:`\nabla_\phi \log q_\phi(z)|_z` (zero in expectation) is
                                dropped (Roeder, Wu & Duvenaud 2017)
==============================  ===========================================================================

All are unbiased for their target; their variances differ, which is what :mod:`ppl_models.compare` measures.

**When an estimator cannot apply** :func:`make_estimator` raises one :class:`EstimatorError` naming the site and
why: a pathwise estimator (``reparameterized``, ``analytic-kl``, ``iwae``, ``sticking-the-landing``) and a guide
site with no reparameterized sampler (a discrete latent); ``analytic-kl`` and a site pair whose KL is unknown;
``iwae`` with ``num_particles < 1``; a baseline estimator when the model sums out (enumerates) a site, because
only ``TraceGraph_ELBO`` has baselines and it cannot enumerate.

**Enumerated model sites.** A model site marked ``infer={"enumerate": "parallel"}`` that the guide does not
sample (the Bayesian GMM's assignments ``z``) is summed out exactly: ``reparameterized``, ``score-function`` and
``sticking-the-landing`` then run on ``TraceEnum_ELBO`` (which takes score-function terms for guide sites whose
reparameterization is switched off); the others raise :class:`EstimatorError`.

How the guide is changed: a :class:`~pyro.poutine.messenger.Messenger` around the guide replaces each latent
site's distribution by a view (:class:`EstimatorView`) that samples without a gradient path
(score-function) or scores with detached parameters (sticking-the-landing); baselines are attached with
``poutine.infer_config``.  Model and guide functions are not modified.

References:
    Williams (1992), Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement Learning.
    Mnih & Gregor (2014), Neural Variational Inference and Learning in Belief Networks.
    Ranganath, Gerrish & Blei (2014), Black Box Variational Inference.
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders.
    Roeder, Wu & Duvenaud (2017), Sticking the Landing: Simple, Lower-Variance Gradient Estimators for VI.
    Mohamed, Rosca, Figurnov & Mnih (2020), Monte Carlo Gradient Estimation in Machine Learning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import pyro
import pyro.distributions as dist
import pyro.infer as infer
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import kl_divergence

from ppl_models.infer.engine import trace_plate_depth
from ppl_models.registry import UnknownNameError

__all__ = [
    "ESTIMATOR_NAMES",
    "PATHWISE",
    "SCORE_FUNCTION",
    "Estimator",
    "EstimatorError",
    "EstimatorView",
    "NeuralBaseline",
    "make_estimator",
    "inspect_sites",
]

#: Estimators that differentiate through the guide's draws.
PATHWISE = ("reparameterized", "analytic-kl", "iwae", "sticking-the-landing")
#: Score-function (REINFORCE) estimators.
SCORE_FUNCTION = ("score-function", "score-function-avg-baseline", "score-function-nn-baseline")
ESTIMATOR_NAMES = ("reparameterized", *SCORE_FUNCTION, "analytic-kl", "iwae", "sticking-the-landing")

#: Estimators that can run on TraceEnum_ELBO when the model enumerates a site.
_ENUM_OK = ("reparameterized", "score-function", "sticking-the-landing")


class EstimatorError(ValueError):
    """An estimator that cannot apply to this model and guide; the message names the site and why."""


# ---------------------------------------------------------------------------------------------------------
# The guide's sites as an estimator sees them
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
        self.mode = mode  # "score" or "stl"

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg) or msg["value"] is not None:
            return
        fn = msg["fn"]
        if self.mode == "score":
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


def _is_latent(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def _base_name(fn) -> str:
    while isinstance(fn, (torch.distributions.Independent, EstimatorView)):
        fn = fn.base_dist if isinstance(fn, torch.distributions.Independent) else fn.base
    return type(fn).__name__


def inspect_sites(model: Callable, guide: Callable, args: tuple, kwargs: dict, data_plate: str = "data") -> Structure:
    """Trace guide and (replayed) model once, without touching any generator or parameter gradient."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]), poutine.block(), pyro.validation_enabled(False):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
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
                any(f.name == data_plate for f in site["cond_indep_stack"]),
                kl_known,
            )
        )
    enumerated = tuple(
        name
        for name, site in model_trace.nodes.items()
        if _is_latent(site) and name not in guide_trace.nodes and site["infer"].get("enumerate") == "parallel"
    )
    return Structure(tuple(sites), enumerated, trace_plate_depth(guide_trace, model_trace))


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


# ---------------------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Estimator:
    """An estimator bound to one model and guide: call :meth:`loss_and_grads` as Pyro's ``ELBO.loss_and_grads``
    with the model's arguments.  ``guide`` is the guide as the estimator runs it (wrapped); ``modules`` holds
    auxiliary networks (the neural baseline), registered in Pyro's param store when the guide runs."""

    name: str
    model: Callable
    guide: Callable
    elbo: infer.ELBO
    num_particles: int
    target: str  # "ELBO" or "IWAE-K"
    structure: Structure
    modules: Dict[str, nn.Module] = field(default_factory=dict)

    def loss_and_grads(self, *args, **kwargs) -> float:
        """One estimate: accumulates gradients into the parameters, returns the loss (-ELBO estimate)."""
        return float(self.elbo.loss_and_grads(self.model, self.guide, *args, **kwargs))

    def loss(self, *args, **kwargs) -> float:
        return float(self.elbo.loss(self.model, self.guide, *args, **kwargs))

    def auxiliary_param_names(self) -> List[str]:
        """Names in Pyro's param store that belong to the estimator (baselines), not to model or guide."""
        store = pyro.get_param_store()
        names = [n for n in store.keys() if n.startswith("__baseline") or n.startswith("nn_baseline$$")]
        return names


def _pathwise_check(name: str, structure: Structure) -> None:
    for s in structure.guide_sites:
        if not s.reparameterizable:
            why = "a discrete latent" if s.discrete else "its distribution has no rsample"
            raise EstimatorError(
                f"estimator {name!r}: guide site {s.name!r} ({s.fn_name}) has no reparameterized sampler "
                f"({why}), so there is no pathwise gradient through it; use 'score-function' "
                "(or a baseline variant) for this guide"
            )


def make_estimator(
    name: str,
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict | None = None,
    *,
    num_particles: int = 1,
    data_plate: str = "data",
    baseline_beta: float = 0.9,
    baseline_hidden: Sequence[int] = (64,),
    vectorize_particles: bool = True,
) -> Estimator:
    """The estimator ``name`` (:data:`ESTIMATOR_NAMES`) for ``model`` and ``guide``.

    :param args: example arguments of model and guide (their structure is traced once to check that the
        estimator applies; e.g. ``(x, idx)``).
    :param kwargs: example keyword arguments (e.g. ``{"num_data": N}``).
    :param num_particles: draws per estimate (``K`` of ``iwae``); score-function estimators with a baseline
        take one draw at a time (their baselines are per draw).
    :param data_plate: the name of the data plate (the neural baseline predicts a cost per datapoint in it).
    :param baseline_beta: decay of ``score-function-avg-baseline``.
    :param baseline_hidden: hidden sizes of the neural baseline.
    :raises EstimatorError: naming the site and why the estimator cannot apply.
    """
    if name not in ESTIMATOR_NAMES:
        raise UnknownNameError("estimator", name, ESTIMATOR_NAMES)
    if name == "iwae" and (not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1):
        raise EstimatorError(
            f"estimator 'iwae': num_particles (K, the number of importance samples) must be an integer >= 1, "
            f"received {num_particles!r}; the IWAE bound averages K >= 1 importance weights"
        )
    if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
        raise EstimatorError(f"estimator {name!r}: num_particles must be an integer >= 1, received {num_particles!r}")
    kwargs = dict(kwargs or {})
    structure = inspect_sites(model, guide, args, kwargs, data_plate)
    if not structure.guide_sites:
        raise EstimatorError(f"estimator {name!r}: the guide samples no latent site: there is nothing to estimate")
    if name in PATHWISE:
        _pathwise_check(name, structure)
    if structure.enumerated and name not in _ENUM_OK:
        why = {
            "score-function-avg-baseline": "baselines exist only in TraceGraph_ELBO, which cannot sum out a site",
            "score-function-nn-baseline": "baselines exist only in TraceGraph_ELBO, which cannot sum out a site",
            "analytic-kl": "TraceMeanField_ELBO cannot sum out a site",
            "iwae": "RenyiELBO cannot sum out a site",
        }[name]
        raise EstimatorError(
            f"estimator {name!r}: the model enumerates site {structure.enumerated[0]!r} "
            f"(infer={{'enumerate': 'parallel'}}, summed out, not sampled by the guide); {why}; "
            f"estimators that apply: {', '.join(_ENUM_OK)}"
        )
    if name == "analytic-kl":
        for s in structure.guide_sites:
            if not s.kl_known:
                raise EstimatorError(
                    f"estimator 'analytic-kl': guide site {s.name!r} ({s.fn_name}): no closed-form KL to the "
                    "model's distribution at that site is registered with torch.distributions.kl_divergence "
                    "(or the site is auxiliary); use 'reparameterized'"
                )
    depth = structure.plate_depth
    vectorize = vectorize_particles and num_particles > 1
    base_kwargs = dict(num_particles=num_particles, vectorize_particles=vectorize_particles)
    base_kwargs["max_plate_nesting"] = depth + int(vectorize)
    modules: Dict[str, nn.Module] = {}
    target = "ELBO"
    wrapped = guide

    if structure.enumerated:
        elbo = infer.TraceEnum_ELBO(**base_kwargs)
    elif name in ("reparameterized", "sticking-the-landing"):
        elbo = infer.Trace_ELBO(**base_kwargs)
    elif name in SCORE_FUNCTION:
        if name != "score-function" and num_particles != 1:
            raise EstimatorError(
                f"estimator {name!r}: baselines are per draw: num_particles must be 1, received {num_particles}"
            )
        elbo = infer.TraceGraph_ELBO(**base_kwargs)
    elif name == "analytic-kl":
        elbo = infer.TraceMeanField_ELBO(**base_kwargs)
    else:  # iwae
        elbo = infer.RenyiELBO(alpha=0.0, **base_kwargs)
        target = f"IWAE-{num_particles}"

    if name in SCORE_FUNCTION:
        wrapped = _wrap_view(guide, "score")
    elif name == "sticking-the-landing":
        wrapped = _wrap_view(guide, "stl")
        # fail now, naming the site, if a site's parameters cannot be detached
        inspect_sites(model, wrapped, args, kwargs, data_plate)

    if name == "score-function-avg-baseline":
        config = {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": float(baseline_beta)}}
        wrapped = poutine.infer_config(wrapped, lambda site: config if _is_latent(site) else {})
    elif name == "score-function-nn-baseline":
        outside = [s.name for s in structure.guide_sites if not s.in_data_plate]
        if outside:
            raise EstimatorError(
                f"estimator 'score-function-nn-baseline': guide site {outside[0]!r} lies outside the data plate "
                f"{data_plate!r}; the neural baseline predicts each datapoint's downstream cost from x_i, so it "
                "applies to local latents only; use 'score-function-avg-baseline'"
            )
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise EstimatorError("estimator 'score-function-nn-baseline': the first argument must be the data tensor x")
        baseline = NeuralBaseline(math.prod(x.shape[1:]), baseline_hidden).to(dtype=x.dtype)
        modules["nn_baseline"] = baseline
        wrapped = _wrap_nn_baseline(wrapped, baseline)
    return Estimator(name, model, wrapped, elbo, num_particles, target, structure, modules)


def _wrap_view(guide: Callable, mode: str) -> Callable:
    def wrapped(*args, **kwargs):
        with _GuideView(mode):
            return guide(*args, **kwargs)

    wrapped.__name__ = f"{getattr(guide, '__name__', 'guide')}_{mode}"
    return wrapped


def _wrap_nn_baseline(guide: Callable, baseline: NeuralBaseline) -> Callable:
    def wrapped(x, *args, **kwargs):
        pyro.module("nn_baseline", baseline)
        config = {"baseline": {"nn_baseline": baseline, "nn_baseline_input": x}}
        return poutine.infer_config(guide, lambda site: config if _is_latent(site) else {})(x, *args, **kwargs)

    return wrapped
