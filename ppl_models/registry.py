"""Registries of models and guides, looked up by name.

A model registers its plain Pyro model function and a ``build(**hparams)``
that returns :class:`ModelParts` (its declared :class:`~ppl_models.spec.ModelSpec`
and its networks).  A guide registers, for one model, for every model of a kind (``kind=...``: models
registered with that ``kind``, e.g. every declared model) or for every model (``model="*"``), its plain
guide function and a ``build(spec, num_data, **hparams)``
that returns the guide's networks; a ``build`` that also takes ``model_modules``
receives the model's networks and may return some of them to share (an exact
posterior guide reads the model's own parameters).  :func:`instantiate` binds the networks to
the functions, giving a model and a guide with the same signature.

Where registrations come from (imported once, on the first lookup by name, in this order):

1. the package's own models and guides, found by scanning it, with no list to edit
   (:func:`builtin_modules`): every model module ``ppl_models/<story>.py`` (all top-level modules but
   the core ones and ``__main__``), then every module of :mod:`ppl_models.guides`, each in sorted order;
2. third-party models, through the entry-point group ``ppl_models.models``: each entry point names a
   module whose import calls :func:`register_model` / :func:`register_guide`, so that an installed
   distribution's model registers like a built-in one.  In the distribution's ``setup.cfg``::

       [options.entry_points]
       ppl_models.models =
           my-model = my_package.my_model

   (``pyproject.toml``: ``[project.entry-points."ppl_models.models"]``).  Entry points load sorted by
   name; one that fails to import raises one :class:`ImportError` naming the entry point and its
   distribution.

A model that a script or a config's ``[model] module`` declares registers when that file is imported
(:func:`load_source`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

from torch import nn

from ppl_models.spec import ModelSpec

__all__ = [
    "ModelParts",
    "ModelEntry",
    "GuideEntry",
    "Instance",
    "register_model",
    "register_guide",
    "get_model",
    "get_guide",
    "model_names",
    "guide_names",
    "instantiate",
    "bind",
    "Bound",
    "unscaled",
    "builtin_modules",
    "load_source",
    "ENTRY_POINT_GROUP",
    "UnknownNameError",
]


class UnknownNameError(KeyError):
    """A name (model, guide, ELBO, optimizer, config key...) that is not registered."""

    def __init__(self, kind: str, name: str, valid):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        plural = kind[:-1] + "ies" if kind.endswith("y") and kind[-2:-1] not in "aeiou" else kind + "s"
        super().__init__(f"unknown {kind} {name!r}; valid {plural}: {', '.join(self.valid) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


@dataclass
class ModelParts:
    """What a model's ``build`` returns."""

    spec: ModelSpec
    modules: Dict[str, nn.Module] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model: Callable
    build: Callable[..., ModelParts]
    doc: str = ""
    kind: str = ""  # models built the same way share a kind (declared models: "declared"); "" for none


@dataclass(frozen=True)
class GuideEntry:
    name: str
    model_name: str  # "*" for a generic guide built from the spec; "" for a guide of a kind of models
    guide: Callable
    build: Callable[..., Dict[str, nn.Module]]
    doc: str = ""
    kind: str = ""  # the kind of models the guide is registered for ("" when registered by model name)


@dataclass
class Instance:
    """A model and a guide with their networks bound (:func:`bind`): call both as ``f(*data, idx)``, which scales a
    batch by ``num_data / len(idx)`` (the ``num_data`` given to :func:`instantiate`), or ``f(*data)`` for the whole
    data set."""

    model_name: str
    guide_name: str
    spec: ModelSpec
    model: Callable
    guide: Optional[Callable]
    modules: nn.ModuleDict  # every network of model and guide, by name
    step: Optional[Callable] = None  # a strategy's step rule for the engine (None: the joint step)


_MODELS: Dict[str, ModelEntry] = {}
_GUIDES: Dict[tuple, GuideEntry] = {}


def register_model(name: str, *, model: Callable, build: Callable[..., ModelParts], kind: str = "") -> ModelEntry:
    """Register ``model`` and its ``build`` under ``name``; ``kind`` (optional) also gives it the guides
    registered for that kind of model."""
    entry = ModelEntry(name, model, build, inspect.getdoc(model) or "", kind)
    _MODELS[name] = entry
    return entry


def register_guide(
    name: str,
    *,
    model: str = "",
    kind: str = "",
    guide: Callable,
    build: Callable[..., Dict[str, nn.Module]],
) -> GuideEntry:
    """Register a guide under ``name`` for one ``model`` (a model name, or ``"*"``: every model) or for
    every model registered with ``kind``; give exactly one of them."""
    if bool(model) == bool(kind):
        raise ValueError(
            f"guide {name!r}: give exactly one of model= (a model name or '*') and kind=; "
            f"received model={model!r}, kind={kind!r}"
        )
    entry = GuideEntry(name, model, guide, build, inspect.getdoc(guide) or "", kind)
    _GUIDES[_guide_key(entry.model_name, kind, name)] = entry
    return entry


def _guide_key(model_name: str, kind: str, name: str) -> tuple:
    return (model_name, name) if model_name else (("kind", kind), name)


#: The entry-point group through which installed distributions register their models and guides.
ENTRY_POINT_GROUP = "ppl_models.models"

#: Top-level modules of the package that are not model modules: the core, the command line, and the
#: declarative toolkit (models declared with it register when the declaring file is imported).
_NOT_MODEL_MODULES = frozenset(
    {"__init__", "__main__", "spec", "registry", "distributions", "encodings", "families", "atomic", "runtime",
     "declarative"}
)


def builtin_modules() -> List[str]:
    """The modules whose import registers the package's own models and guides: every model module
    (a top-level module of :mod:`ppl_models` other than the core ones, ``__main__`` and
    :mod:`ppl_models.declarative`, which declares no model itself), then every module of
    :mod:`ppl_models.guides`; each group sorted by name."""
    # Located, not imported: the registry (core) depends on no model or guide module; it finds them by name.
    package, guides_package = (importlib.util.find_spec(p) for p in ("ppl_models", "ppl_models.guides"))
    models = sorted(
        m.name
        for m in pkgutil.iter_modules(package.submodule_search_locations)
        if not m.ispkg and m.name not in _NOT_MODEL_MODULES
    )
    guides = sorted(m.name for m in pkgutil.iter_modules(guides_package.submodule_search_locations) if not m.ispkg)
    return [f"ppl_models.{m}" for m in models] + [f"ppl_models.guides.{g}" for g in guides]


def _entry_points() -> list:
    """The group's entry points, sorted by name (then value) for a deterministic registration order."""
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.name, ep.value))


def _load_entry_point(ep) -> None:
    dist = getattr(ep, "dist", None)
    where = f"distribution {dist.name!r} {dist.version}" if dist is not None else "an unknown distribution"
    try:
        ep.load()
    except Exception as exc:
        raise ImportError(
            f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP!r}) of {where} failed to import: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


_LOADED = False  # the built-in modules and entry points have all been imported
_LOADING = False  # they are being imported (a lookup during that import must not start again)


def _load_registrations() -> None:
    """Import, once, the package's model and guide modules, then the entry points (see the docstring).
    A failing entry point raises, and the next lookup tries again."""
    global _LOADED, _LOADING
    if _LOADED or _LOADING:
        return
    _LOADING = True
    try:
        for name in builtin_modules():
            importlib.import_module(name)
        for ep in _entry_points():
            _load_entry_point(ep)
        _LOADED = True
    finally:
        _LOADING = False


_SOURCES: Dict[str, object] = {}


def load_source(source: str):
    """Import the module that declares and registers a user's model (a config's ``[model] module``):
    a path to a ``.py`` file (relative to the working directory) or a dotted module name.  Each file is
    executed once per process."""
    import sys
    from pathlib import Path

    if not isinstance(source, str) or not source:
        raise TypeError(f"model module: expected a .py path or a dotted module name (str), received {source!r}")
    if not source.endswith(".py"):
        try:
            return importlib.import_module(source)
        except ImportError as exc:
            raise ValueError(f"model module {source!r}: cannot import it ({exc})") from None
    path = Path(source).resolve()
    if str(path) in _SOURCES:
        return _SOURCES[str(path)]
    if not path.is_file():
        raise ValueError(f"model module {source!r}: expected a Python file, {path} does not exist")
    name = "ppl_models_user_" + "".join(c if c.isalnum() else "_" for c in path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _SOURCES[str(path)] = module
    return module


def model_names():
    _load_registrations()
    return sorted(_MODELS)


def get_model(name: str) -> ModelEntry:
    _load_registrations()
    if name not in _MODELS:
        raise UnknownNameError("model", name, _MODELS)
    return _MODELS[name]


def _guide_keys(model_name: str, name: str):
    """Where a guide ``name`` of ``model_name`` is looked up, most specific first: the model's own, its
    kind's, every model's."""
    keys = [(model_name, name)]
    entry = _MODELS.get(model_name)
    if entry is not None and entry.kind:
        keys.append(_guide_key("", entry.kind, name))
    keys.append(("*", name))
    return keys


def guide_names(model_name: str):
    _load_registrations()
    owners = {owner for owner, _ in _guide_keys(model_name, "")}
    return sorted({g for (owner, g) in _GUIDES if owner in owners})


def get_guide(model_name: str, name: str) -> GuideEntry:
    _load_registrations()
    for key in _guide_keys(model_name, name):
        if key in _GUIDES:
            return _GUIDES[key]
    raise UnknownNameError(f"guide for model {model_name!r}", name, guide_names(model_name))


def check_kwargs(what: str, fn: Callable, kwargs: Mapping, skip=()) -> None:
    """Raise one error naming a keyword ``fn`` does not take (listing the valid ones), or a value
    whose type differs from the type of the keyword's default (naming the expected type)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if n not in skip and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key, value in kwargs.items():
        if key not in valid:
            raise UnknownNameError(f"{what} hyperparameter", key, valid)
        default = params[key].default
        expected = _expected_type(default)
        if expected is not None and value is not None and not _is_instance(value, expected):
            raise TypeError(
                f"{what} hyperparameter {key!r}: expected {expected.__name__} (like its default {default!r}), "
                f"received {type(value).__name__} {value!r}"
            )


def _expected_type(default):
    if default is inspect.Parameter.empty or default is None:
        return None
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float if isinstance(default, float) else int
    if isinstance(default, str):
        return str
    if isinstance(default, (list, tuple)):
        return list
    return None


def _is_instance(value, expected) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, expected)


def instantiate(
    model_name: str,
    guide_name: Optional[str],
    *,
    num_data: int | None,
    model_kwargs: Mapping | None = None,
    guide_kwargs: Mapping | None = None,
) -> Instance:
    """Build a model's and a guide's networks and bind them to the plain functions
    (``guide_name=None``: the model alone, for strategies that make their own guide)."""
    model_kwargs, guide_kwargs = dict(model_kwargs or {}), dict(guide_kwargs or {})
    entry = get_model(model_name)
    check_kwargs(f"model {model_name!r}", entry.build, model_kwargs)
    parts = entry.build(**model_kwargs)
    model = bind(entry.model, parts.modules, num_data)
    if guide_name is None:
        if guide_kwargs:
            raise ValueError(f"guide hyperparameters {sorted(guide_kwargs)} given but no guide")
        return Instance(model_name, None, parts.spec, model, None, nn.ModuleDict(parts.modules))
    gentry = get_guide(model_name, guide_name)
    check_kwargs(f"guide {guide_name!r}", gentry.build, guide_kwargs, skip=("spec", "num_data", "model_modules"))
    if "model_modules" in inspect.signature(gentry.build).parameters:
        # A guide that reads the model's own parameters (an exact posterior) or changes how the model
        # runs (the collapsed form enumerates a latent) receives the model's modules.
        guide_kwargs["model_modules"] = parts.modules
    guide_modules = gentry.build(parts.spec, num_data=num_data, **guide_kwargs)
    clash = {k for k in set(parts.modules) & set(guide_modules) if parts.modules[k] is not guide_modules[k]}
    if clash:
        raise ValueError(f"model and guide both name a network {sorted(clash)}; rename one")
    modules = nn.ModuleDict({**parts.modules, **guide_modules})
    guide = bind(gentry.guide, guide_modules, num_data)
    return Instance(model_name, guide_name, parts.spec, model, guide, modules)


class Bound(functools.partial):
    """A model or guide ``fn(*data, idx=None, *, <networks>, num_data=None)`` with its networks bound (a
    :class:`functools.partial`: ``func`` and ``keywords`` as usual) and ``num_data`` the default size of the data set
    that a batch's ``idx`` indexes.

    Called with ``idx`` and without ``num_data``, it passes ``num_data``, so the data plate scales the batch's
    log-densities by N / |idx|: ``pyro.infer.SVI(model, guide, optim, elbo).step(x, idx)`` estimates the ELBO of the
    whole data set, as the engine's steps do.  Called without ``idx`` (the batch is the whole data set) or with
    ``num_data`` given (``num_data=None``: no scaling, as the evaluator scores each datapoint), it passes what it is
    given.  Its signature is ``fn``'s without the networks, ``num_data`` defaulting to N."""

    def __new__(cls, fn: Callable, modules: Mapping[str, nn.Module], num_data: int | None = None):
        self = super().__new__(cls, fn, **modules)
        signature = inspect.signature(fn)
        names = list(signature.parameters)
        takes = _takes_num_data(signature.parameters)
        self._idx_position = names.index("idx") if num_data is not None and takes and "idx" in names else None
        self.num_data = num_data
        functools.update_wrapper(self, fn)
        params = [p for name, p in signature.parameters.items() if name not in modules]
        if num_data is not None:
            params = [p.replace(default=num_data) if p.name == "num_data" else p for p in params]
        self.__signature__ = signature.replace(parameters=params)
        return self

    def __call__(self, /, *args, **kwargs):
        position = self._idx_position
        if position is not None and "num_data" not in kwargs:
            idx = args[position] if len(args) > position else kwargs.get("idx")
            if idx is not None:
                kwargs["num_data"] = self.num_data
        return super().__call__(*args, **kwargs)

    def __reduce__(self):  # pickled as what it is built from (functools.partial's own state omits num_data)
        return (type(self), (self.func, self.keywords, self.num_data))


def _takes_num_data(params: Mapping[str, inspect.Parameter]) -> bool:
    """Whether a signature's ``params`` accept a ``num_data`` keyword (by name or ``**kwargs``)."""
    return "num_data" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def unscaled(*programs: Callable) -> dict:
    """``{"num_data": None}`` when every program (model, guide) takes ``num_data``, else ``{}``: the keywords that
    score a batch given with its indices unscaled, although a :class:`Bound` program defaults to N / |idx|."""
    for fn in programs:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return {}
        if not _takes_num_data(params):
            return {}
    return {"num_data": None}


def bind(fn: Callable, modules: Mapping[str, nn.Module], num_data: int | None = None) -> Bound:
    """``fn`` with its networks bound and ``num_data`` its default for batches given with ``idx`` (:class:`Bound`)."""
    return Bound(fn, modules, num_data)
