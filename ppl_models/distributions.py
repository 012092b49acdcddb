r"""Distributions the models share.

:class:`TokenCategorical` — the categorical over a vocabulary of the sentence models (:mod:`ppl_models.lstm_lm`,
:mod:`ppl_models.bigram`, :mod:`ppl_models.text_vae`, :mod:`ppl_models.vrnn`) and of the latent-alignment model's
outputs (:mod:`ppl_models.alignment`).
"""

from __future__ import annotations

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.nn import functional as F

__all__ = ["TokenCategorical"]


class TokenCategorical(TorchDistribution):
    r"""A categorical distribution over the last dim of ``logits`` (unnormalized, entries may be :math:`-\infty`),
    batch shape ``logits.shape[:-1]``.

    The same density as ``pyro.distributions.Categorical(logits=logits)``, but ``log_prob`` is one fused
    ``log_softmax``/``nll`` (``F.cross_entropy``) instead of normalizing the whole ``(..., V)`` table at
    construction: the softmax over a 10k vocabulary is most of a language model's cost.

    :param logits: unnormalized logits, ``batch_shape + (V,)``.
    """

    arg_constraints = {"logits": constraints.real}
    has_enumerate_support = False

    def __init__(self, logits: torch.Tensor, validate_args=None):
        self.logits = logits
        self.num_categories = logits.shape[-1]
        super().__init__(logits.shape[:-1], torch.Size(), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.num_categories - 1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return TokenCategorical(self.logits.expand(batch_shape + (self.num_categories,)), validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        logits = self.logits.expand(shape + (self.num_categories,)).reshape(-1, self.num_categories)
        value = value.expand(shape).reshape(-1)
        return -F.cross_entropy(logits, value, reduction="none").reshape(shape)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return torch.distributions.Categorical(logits=self.logits).sample(sample_shape)
