"""Registries of models and guides, looked up by name.

A model registers its plain Pyro model function and a ``build(**hparams)``
that returns :class:`ModelParts` (its declared :class:`~ppl_models.spec.ModelSpec`
and its networks).  A guide registers, for one model or for every model
(``model="*"``), its plain guide function and a ``build(spec, num_data, **hparams)``
that returns the guide's networks; a ``build`` that also takes ``model_modules``
receives the model's networks and may return some of them to share (an exact
posterior guide reads the model's own parameters).  :func:`instantiate` binds the networks to
the functions, giving a model and a guide with the same signature.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional

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


@dataclass(frozen=True)
class GuideEntry:
    name: str
    model_name: str  # "*" for a generic guide built from the spec
    guide: Callable
    build: Callable[..., Dict[str, nn.Module]]
    doc: str = ""


@dataclass
class Instance:
    """A model and a guide with their networks bound: call both as ``f(*data, num_data=N)``."""

    model_name: str
    guide_name: str
    spec: ModelSpec
    model: Callable
    guide: Optional[Callable]
    modules: nn.ModuleDict  # every network of model and guide, by name
    step: Optional[Callable] = None  # a strategy's step rule for the engine (None: the joint step)


_MODELS: Dict[str, ModelEntry] = {}
_GUIDES: Dict[tuple, GuideEntry] = {}


def register_model(name: str, *, model: Callable, build: Callable[..., ModelParts]) -> ModelEntry:
    entry = ModelEntry(name, model, build, inspect.getdoc(model) or "")
    _MODELS[name] = entry
    return entry


def register_guide(
    name: str, *, model: str, guide: Callable, build: Callable[..., Dict[str, nn.Module]]
) -> GuideEntry:
    entry = GuideEntry(name, model, guide, build, inspect.getdoc(guide) or "")
    _GUIDES[(model, name)] = entry
    return entry


#: Modules whose import registers the package's own models and guides.
BUILTIN_MODULES = (
    "ppl_models.vae",
    "ppl_models.guides.mean_field",
    "ppl_models.guides.amortized",
    "ppl_models.guides.vae",
    "ppl_models.linear_gaussian",
    "ppl_models.guides.linear_gaussian",
    "ppl_models.gmm",
    "ppl_models.guides.gmm",
    "ppl_models.bayesian_gmm",
    "ppl_models.guides.bayesian_gmm",
    "ppl_models.cvae",
    "ppl_models.guides.cvae",
    "ppl_models.lstm_lm",
    "ppl_models.bigram",
    "ppl_models.text_vae",
    "ppl_models.guides.text_vae",
    "ppl_models.vrnn",
    "ppl_models.guides.vrnn",
    "ppl_models.alignment",
    "ppl_models.guides.alignment",
)


def _load_builtins() -> None:
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


_SOURCES: Dict[str, object] = {}


def load_source(source: str):
    """Import the module that declares and registers a user's model (a config's ``[model] module``):
    a path to a ``.py`` file (relative to the working directory) or a dotted module name.  Each file is
    executed once per process."""
    import importlib.util
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
    _load_builtins()
    return sorted(_MODELS)


def get_model(name: str) -> ModelEntry:
    _load_builtins()
    if name not in _MODELS:
        raise UnknownNameError("model", name, _MODELS)
    return _MODELS[name]


def guide_names(model_name: str):
    _load_builtins()
    return sorted({g for (m, g) in _GUIDES if m in (model_name, "*")})


def get_guide(model_name: str, name: str) -> GuideEntry:
    _load_builtins()
    for key in ((model_name, name), ("*", name)):
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
    model = functools.partial(entry.model, **parts.modules)
    functools.update_wrapper(model, entry.model)
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
    guide = functools.partial(gentry.guide, **guide_modules)
    functools.update_wrapper(guide, gentry.guide)
    return Instance(model_name, guide_name, parts.spec, model, guide, modules)
