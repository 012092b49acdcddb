"""ppl_models: latent-variable models in Pyro, their guides, SVI and honest evaluation.

See README.md, "How it fits together": data -> model + guide -> estimator/strategy
-> engine -> evaluation.

Importing the package is cheap: the public names below load torch and Pyro on first use (PEP 562), so the
command line can parse its arguments, and choose the threading policy
(:func:`ppl_models.runtime.configure`), before torch starts its OpenMP runtime.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LatentSite": "ppl_models.spec",
    "ModelSpec": "ppl_models.spec",
    "ObservedSite": "ppl_models.spec",
    "ShapeError": "ppl_models.spec",
    "get_guide": "ppl_models.registry",
    "get_model": "ppl_models.registry",
    "guide_names": "ppl_models.registry",
    "instantiate": "ppl_models.registry",
    "model_names": "ppl_models.registry",
    "register_guide": "ppl_models.registry",
    "register_model": "ppl_models.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ppl_models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
