r"""Declare a latent-variable model by its sites; get a plain Pyro model, its :class:`~ppl_models.spec.ModelSpec`
and a registry entry.

A declaration lists, in the order of the generative story, the **local latent sites** (one draw per datapoint)
and last the **observed site**, each with its per-datapoint shape and a function returning its distribution;
plus the model's hyperparameters (with defaults), its networks and free parameters.  For each datapoint
:math:`i` the built model runs

1. :math:`z^{(1)}_i \sim p(z^{(1)})`, :math:`z^{(2)}_i \sim p(z^{(2)} \mid z^{(1)}_i)`, ... (the declared latents)
2. :math:`x_i \sim p(x \mid z_i)` (the observed site)

inside one ``pyro.plate("data")`` (subsampled by ``idx``, scaled by ``num_data / batch`` by the plate).

The distribution functions name what they read as their parameters: hyperparameters, networks, free
parameters and latent sites sampled before them; each is passed by name.  A function may return a
distribution whose batch shape ends in the declared shape, or that broadcasts to it: the builder expands it
and moves those dims to the event (``.to_event``), so a prior can be written ``Normal(0., 1.)``.  Shapes are
tuples of ints or hyperparameter names.

.. code-block:: python

    from ppl_models.declarative import Latent, Observed, declare_model

    declare_model(
        "ppca",
        hparams={"z_dim": 2, "x_dim": 5},
        networks={"loading": lambda z_dim, x_dim: torch.nn.Linear(z_dim, x_dim)},
        params={"log_noise_scale": lambda x_dim: torch.zeros(x_dim)},
        sites=[
            Latent("z", ("z_dim",), lambda: dist.Normal(0.0, 1.0)),
            Observed("x", ("x_dim",),
                     lambda z, loading, log_noise_scale: dist.Normal(loading(z), log_noise_scale.exp())),
        ],
    )

Registered under its name, the model works with everything built from a ``ModelSpec`` and the model's
signature ``model(x, idx=None, *, networks, num_data=None)``: the generic guides ``mean-field`` and
``amortized-mlp`` (also registered as ``amortized`` for declared models, by :mod:`ppl_models.guides.declarative`),
the inference strategies, the engine, ``ppl-models
fit / evaluate`` and TOML configs (``[model]`` keys are the declared hyperparameters, checked by name and
type; ``module = "path/to/file.py"`` imports the file that declares the model), importance-sampled
evaluation and the plots.  Only local latents are supported (global latent variables are free parameters).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from ppl_models import registry
from ppl_models.registry import ModelParts
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite, ShapeError, check_tensor, data_plate

__all__ = ["KIND", "Latent", "Observed", "DeclarationError", "DeclaredNetworks", "DeclaredModel", "declare_model"]

Shape = Tuple[Any, ...]  # ints or hyperparameter names

#: The registry kind of every declared model; guides registered for it (``register_guide(..., kind=KIND)``,
#: see :mod:`ppl_models.guides.declarative`) apply to each.
KIND = "declared"


class DeclarationError(ValueError):
    """A declaration that cannot be built; the message names the site or key."""


@dataclass(frozen=True)
class Latent:
    """A local latent site.

    :param name: the Pyro site name.
    :param shape: per-datapoint event shape: ints or hyperparameter names, e.g. ``("z_dim",)``.
    :param prior: returns its distribution given the names it takes as parameters.
    :param support: support of the prior (for the guides: ``constraints.positive`` gives a log-normal guide).
    :param num_categories: for a discrete site, its number of values (an int or a hyperparameter name).
    """

    name: str
    shape: Shape
    prior: Callable[..., dist.Distribution]
    support: constraints.Constraint = constraints.real
    num_categories: Any = None


@dataclass(frozen=True)
class Observed:
    """The observed site (declared last).

    :param name: the Pyro site name.
    :param shape: per-datapoint event shape (ints or hyperparameter names).
    :param likelihood: returns its distribution given the names it takes as parameters.
    :param support: support of the data; batches are checked against it.
    """

    name: str
    shape: Shape
    likelihood: Callable[..., dist.Distribution]
    support: constraints.Constraint = constraints.real


def _arg_names(fn: Callable, what: str) -> Tuple[str, ...]:
    if not callable(fn):
        raise DeclarationError(f"{what}: expected a function, received {type(fn).__name__}")
    params = inspect.signature(fn).parameters.values()
    bad = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if bad:
        raise DeclarationError(f"{what}: parameters are looked up by name; *args/**kwargs ({bad[0]}) are not supported")
    return tuple(p.name for p in params)


def _check_args(fn: Callable, what: str, available: Sequence[str]) -> Tuple[str, ...]:
    names = _arg_names(fn, what)
    for name in names:
        if name not in available:
            valid = ", ".join(sorted(available)) or "(none)"
            raise DeclarationError(f"{what}: unknown argument {name!r}; valid names at this point: {valid}")
    return names


class DeclaredNetworks(nn.Module):
    """Everything a declared model holds: its networks (``nets``), free parameters (``params``), the
    resolved hyperparameters and spec.  Passed to the model as the keyword ``networks`` and registered
    with ``pyro.module("networks", ...)``."""

    def __init__(
        self,
        spec: ModelSpec,
        hparams: Mapping[str, Any],
        nets: Mapping[str, nn.Module],
        params: Mapping[str, torch.Tensor],
    ):
        super().__init__()
        self.spec, self.hparams = spec, dict(hparams)
        self.nets = nn.ModuleDict(nets)
        dtype = torch.get_default_dtype()
        self.params = nn.ParameterDict({k: nn.Parameter(torch.as_tensor(v, dtype=dtype)) for k, v in params.items()})

    def values(self) -> Dict[str, Any]:
        """Names the distribution functions may read: hyperparameters, networks, parameters."""
        return {**self.hparams, **dict(self.nets.items()), **dict(self.params.items())}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


def _as_site_distribution(site_name: str, fn_value, shape: Tuple[int, ...]) -> dist.Distribution:
    """``fn_value`` expanded and ``.to_event``-ed so that its event shape is ``shape``; else one ShapeError."""
    if not isinstance(fn_value, torch.distributions.Distribution):
        raise ShapeError(
            f"site {site_name!r}: expected its function to return a distribution, received {type(fn_value).__name__}"
        )
    d = fn_value
    n = len(shape) - len(d.event_shape)
    if n < 0 or tuple(d.event_shape) != tuple(shape[n:]):
        raise ShapeError(
            f"site {site_name!r}: expected a distribution with per-datapoint event shape {tuple(shape)}, received "
            f"batch_shape {tuple(d.batch_shape)} and event_shape {tuple(d.event_shape)}"
        )
    if n == 0:
        return d
    batch = tuple(d.batch_shape)
    lead, tail = (batch[:-n], batch[-n:]) if len(batch) >= n else ((), batch)
    if tail != tuple(shape[:n]):
        try:
            torch.broadcast_shapes(tail, shape[:n])
            d = d.expand(lead + tuple(shape[:n]))
        except (RuntimeError, ValueError):
            raise ShapeError(
                f"site {site_name!r}: expected a distribution whose batch shape ends in (or broadcasts to) "
                f"{tuple(shape[:n])} before the event shape {tuple(d.event_shape)}, received batch_shape {batch}"
            ) from None
    return d.to_event(n)


class DeclaredModel:
    """A built declaration (see the module docstring): ``model`` is a plain Pyro model function,
    ``build(**hparams)`` returns :class:`~ppl_models.registry.ModelParts` (its spec and ``{"networks": ...}``)."""

    def __init__(
        self,
        name: str,
        sites: Sequence[Latent | Observed],
        *,
        hparams: Optional[Mapping[str, Any]] = None,
        networks: Optional[Mapping[str, Callable[..., nn.Module]]] = None,
        params: Optional[Mapping[str, Callable[..., torch.Tensor]]] = None,
        doc: str = "",
    ):
        if not isinstance(name, str) or not name:
            raise DeclarationError(f"model name: expected a non-empty string, received {name!r}")
        self.name, self.hparams = name, dict(hparams or {})
        self.networks, self.params = dict(networks or {}), dict(params or {})
        for key in ("networks", "idx", "num_data", "x"):
            if key in self.hparams:
                raise DeclarationError(f"hyperparameter {key!r}: the name is reserved, choose another")
        sites = list(sites)
        if not sites or not isinstance(sites[-1], Observed) or any(isinstance(s, Observed) for s in sites[:-1]):
            raise DeclarationError(
                f"model {name!r}: expected local Latent sites followed by exactly one Observed site, last"
            )
        self.latents: Tuple[Latent, ...] = tuple(sites[:-1])
        self.observed: Observed = sites[-1]
        for s in self.latents:
            if not isinstance(s, Latent):
                raise DeclarationError(
                    f"model {name!r}: expected Latent or Observed sites, received {type(s).__name__}"
                )
        hp = list(self.hparams)
        self._factory_args = {}
        for kind, table in (("network", self.networks), ("parameter", self.params)):
            for key, factory in table.items():
                self._factory_args[key] = _check_args(factory, f"{kind} {key!r}", hp)
        available = hp + list(self.networks) + list(self.params)
        seen = set(available)
        self._site_args = {}
        for s in sites:
            if s.name in seen:
                raise DeclarationError(
                    f"site {s.name!r}: the name is already used by a hyperparameter, network, parameter or site"
                )
            for dim in s.shape:
                if not (isinstance(dim, int) and dim > 0) and dim not in self.hparams:
                    raise DeclarationError(
                        f"site {s.name!r}: shape entry {dim!r} is neither a positive int nor a hyperparameter "
                        f"({', '.join(hp) or 'none declared'})"
                    )
            fn = s.prior if isinstance(s, Latent) else s.likelihood
            self._site_args[s.name] = _check_args(fn, f"site {s.name!r}", available)
            available = available + [s.name]
            seen.add(s.name)
        self.doc = inspect.cleandoc(doc) if doc else f"Declared model {name!r}."
        self.model = self._make_model()
        self.build = self._make_build()

    # ------------------------------------------------------------------ building
    def _resolve(self, shape: Shape, hparams: Mapping[str, Any]) -> Tuple[int, ...]:
        return tuple(int(hparams[d]) if isinstance(d, str) else int(d) for d in shape)

    def make_spec(self, **hparams) -> ModelSpec:
        hp = {**self.hparams, **hparams}
        latents = []
        for s in self.latents:
            k = s.num_categories
            num_categories = hp[k] if isinstance(k, str) else k
            latents.append(LatentSite(s.name, self._resolve(s.shape, hp), s.support, num_categories))
        o = self.observed
        return ModelSpec(self.name, ObservedSite(o.name, self._resolve(o.shape, hp), o.support), "data", tuple(latents))

    def _make_build(self) -> Callable[..., ModelParts]:
        def build(**hparams) -> ModelParts:
            registry.check_kwargs(f"model {self.name!r}", build, hparams)
            hp = {**self.hparams, **hparams}
            spec = self.make_spec(**hp)
            nets, params = {}, {}
            for key, factory in self.networks.items():
                net = factory(**{a: hp[a] for a in self._factory_args[key]})
                if not isinstance(net, nn.Module):
                    raise DeclarationError(
                        f"network {key!r}: expected its factory to return an nn.Module, received {type(net).__name__}"
                    )
                nets[key] = net
            for key, factory in self.params.items():
                params[key] = factory(**{a: hp[a] for a in self._factory_args[key]})
            return ModelParts(spec=spec, modules={"networks": DeclaredNetworks(spec, hp, nets, params)})

        build.__signature__ = inspect.Signature(
            [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in self.hparams.items()]
        )
        build.__doc__ = f"Networks and spec of {self.name!r}; keywords: its hyperparameters {self.hparams}."
        return build

    def _run(self, x, idx, networks: DeclaredNetworks, num_data, batch_size):
        spec = networks.spec
        values = networks.values()
        if x is None:
            plate = pyro.plate(spec.data_plate, batch_size, dim=-1)
        else:
            plate = data_plate(x, idx, num_data, spec.data_plate)
        with plate:
            for s, site in zip(self.latents, spec.local_latents):
                fn_value = s.prior(**{a: values[a] for a in self._site_args[s.name]})
                values[s.name] = pyro.sample(s.name, _as_site_distribution(s.name, fn_value, site.event_shape))
            o = self.observed
            fn_value = o.likelihood(**{a: values[a] for a in self._site_args[o.name]})
            return pyro.sample(o.name, _as_site_distribution(o.name, fn_value, spec.observed.event_shape), obs=x)

    def _make_model(self) -> Callable:
        declared = self

        def model(
            x: torch.Tensor, idx: torch.Tensor | None = None, *, networks: DeclaredNetworks, num_data: int | None = None
        ):
            spec = networks.spec
            check_tensor(spec.observed.name, x, event_shape=spec.observed.event_shape, support=spec.observed.support)
            pyro.module("networks", networks)
            return declared._run(x, idx, networks, num_data, None)

        model.__doc__ = (
            self.doc
            + "\n\n:param x: observations, shape ``(batch,) + observed event shape``."
            + "\n:param idx: indices of the batch in the data set, shape ``(batch,)``; ``None``: ``x`` is all the data."
            + "\n:param networks: the :class:`DeclaredNetworks` from ``build`` (registered as ``\"networks\"``)."
            + "\n:param num_data: size of the full data set (the plate's scale)."
        )
        model.__name__ = model.__qualname__ = self.name.replace("-", "_") + "_model"
        return model

    # --------------------------------------------------------------- simulation
    @torch.no_grad()
    def simulate(self, networks: DeclaredNetworks, num_data: int) -> Dict[str, torch.Tensor]:
        """Draw ``num_data`` datapoints from the model (latents from their priors, then the observed site).

        :return: ``{site name: value}``, each of shape ``(num_data,) + event_shape``; randomness from torch's
            global generator (seed it, or use ``torch.random.fork_rng``).
        """
        trace = pyro.poutine.trace(self._run).get_trace(None, None, networks, None, num_data)
        plate = networks.spec.data_plate
        return {name: site["value"] for name, site in trace.nodes.items() if site["type"] == "sample" and name != plate}

    def register(self) -> "DeclaredModel":
        """Register the model under its name, of kind :data:`KIND`: it takes the generic guides
        (``mean-field``, ``amortized-mlp``) and those registered for declared models
        (:mod:`ppl_models.guides.declarative`: ``amortized``, an alias of ``amortized-mlp``)."""
        registry.register_model(self.name, model=self.model, build=self.build, kind=KIND)
        return self


def declare_model(
    name: str,
    sites: Sequence[Latent | Observed],
    *,
    hparams: Optional[Mapping[str, Any]] = None,
    networks: Optional[Mapping[str, Callable[..., nn.Module]]] = None,
    params: Optional[Mapping[str, Callable[..., torch.Tensor]]] = None,
    doc: str = "",
    register: bool = True,
) -> DeclaredModel:
    """Build a :class:`DeclaredModel` and (``register=True``) register it under ``name``.

    :param name: registry name.
    :param sites: :class:`Latent` sites in the order of the generative story, then one :class:`Observed`.
    :param hparams: hyperparameters and their defaults (their types are the config's expected types).
    :param networks: ``{name: factory(**hparams it names) -> nn.Module}``.
    :param params: ``{name: factory(**hparams it names) -> initial tensor}`` (free parameters, trained).
    :param doc: the generative story (the model function's docstring).
    """
    declared = DeclaredModel(name, sites, hparams=hparams, networks=networks, params=params, doc=doc)
    return declared.register() if register else declared
