"""ppl_models: latent-variable models in Pyro, their guides, SVI and honest evaluation.

See README.md, "How it fits together": data -> model + guide -> estimator/strategy
-> engine -> evaluation.
"""

from ppl_models.registry import get_guide, get_model, guide_names, instantiate, model_names, register_guide, register_model
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite, ShapeError

__version__ = "0.1.0"

__all__ = [
    "LatentSite",
    "ModelSpec",
    "ObservedSite",
    "ShapeError",
    "get_guide",
    "get_model",
    "guide_names",
    "instantiate",
    "model_names",
    "register_guide",
    "register_model",
]
