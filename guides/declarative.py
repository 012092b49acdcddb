"""Guides for the models declared with :mod:`ppl_models.declarative` (every model of kind ``"declared"``).

A declared model takes the generic guides built from its :class:`~ppl_models.spec.ModelSpec`
(:mod:`ppl_models.guides.mean_field` as ``mean-field``, :mod:`ppl_models.guides.amortized` as
``amortized-mlp``) like every model; here it also gets

``amortized`` — the generic amortized MLP encoder (``amortized-mlp``) under the short name a config's
``[guide]`` defaults to, so that a declared model fits with no ``[guide] name``.
"""

from __future__ import annotations

from ppl_models.declarative import KIND
from ppl_models.guides import amortized
from ppl_models.registry import register_guide

register_guide("amortized", kind=KIND, guide=amortized.guide, build=amortized.build)
