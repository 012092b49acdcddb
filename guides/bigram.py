"""The guide of the bigram language model :mod:`ppl_models.bigram`.

``empty`` — the model has no latent variable (its transition probabilities are fitted from counts, not
sampled): :func:`ppl_models.guides.lstm_lm.empty_guide`, which samples nothing.
"""

from __future__ import annotations

from ppl_models.guides.lstm_lm import build_empty_guide, empty_guide
from ppl_models.registry import register_guide

register_guide("empty", model="bigram", guide=empty_guide, build=build_empty_guide)
