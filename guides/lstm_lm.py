"""The guide of the LSTM language model :mod:`ppl_models.lstm_lm`.

``empty`` — the model has no latent variable, so its guide samples nothing: the ELBO is the log-likelihood
:math:`\\log p(x)` itself (SVI with ``Trace_ELBO`` is maximum likelihood; the evaluator's importance-sampled
log-likelihood is exact with one sample).  The bigram model (:mod:`ppl_models.guides.bigram`) uses it too.
"""

from __future__ import annotations

from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec

__all__ = ["empty_guide", "build_empty_guide"]


def empty_guide(tokens, lengths, idx=None, *, num_data=None, **unused):
    """The guide of a sentence model without latent variables: samples nothing (the ELBO is the log-likelihood)."""


def build_empty_guide(spec: ModelSpec, num_data: int | None = None):
    """The empty guide has no networks."""
    return {}


register_guide("empty", model="lstm-lm", guide=empty_guide, build=build_empty_guide)
