r"""KL annealing (Bowman et al. 2016): the weight :math:`\beta_s` of the latent sites' terms at training step :math:`s`.

The annealed objective at step :math:`s` is

.. math::  \mathcal{L}_\beta = \mathbb{E}_q[\log p(x \mid z)] - \beta_s\, \mathrm{KL}(q(z \mid x) \,\|\, p(z)),

obtained without touching any log-density by hand: the models and guides that support annealing
(:mod:`ppl_models.text_vae`, :mod:`ppl_models.vrnn`) take a keyword ``kl_weight`` and sample their latent
sites inside ``poutine.scale(scale=kl_weight)`` — in the model (:math:`\log p(z)`) and in the guide
(:math:`\log q(z \mid x)`) — so any Pyro ELBO computes :math:`\mathcal{L}_\beta`.  :class:`AnnealedTrainer` passes
``kl_weight = schedule(step)`` (and the word-dropout keep rate) to model and guide at every training step;
validation and evaluation call them without it (:math:`\beta = 1`, the true ELBO).

Schedules (``step`` counts optimizer steps from 0; ``poutine.scale`` needs :math:`\beta > 0`):

* ``constant``: :math:`\beta_s = 1` (no annealing);
* ``linear``: :math:`\beta_s = \min(1, (s + 1) / W)` with ``warmup_steps`` :math:`W` — :math:`1/W` at the first step,
  exactly 1 from step :math:`W - 1` on;
* ``sigmoid`` (Bowman et al.'s logistic): :math:`\beta_s = 1 / (1 + e^{-k (s - s_0)})` with ``rate`` :math:`k` and
  ``midpoint`` :math:`s_0` (exactly 1/2 at :math:`s_0`), floored at ``1e-12`` where it underflows.

References:
    Bowman, Vilnis, Vinyals, Dai, Jozefowicz & Bengio (2016), Generating Sentences from a Continuous Space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ppl_models.infer.engine import Trainer

__all__ = ["SCHEDULES", "MIN_WEIGHT", "KLSchedule", "AnnealedTrainer"]

SCHEDULES = ("constant", "linear", "sigmoid")
#: Smallest weight a schedule returns (``poutine.scale`` rejects 0).
MIN_WEIGHT = 1e-12


@dataclass(frozen=True)
class KLSchedule:
    """A KL weight schedule (see the module docstring); call it with the step.

    :param kind: ``"constant"``, ``"linear"`` or ``"sigmoid"``.
    :param warmup_steps: ``linear``: steps :math:`W` to reach 1.
    :param rate: ``sigmoid``: slope :math:`k` per step.
    :param midpoint: ``sigmoid``: step :math:`s_0` where the weight is 1/2.
    """

    kind: str = "constant"
    warmup_steps: int = 1000
    rate: float = 0.0025
    midpoint: float = 2500.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"KL schedule: expected one of {', '.join(SCHEDULES)}, received {self.kind!r}")
        if self.kind == "linear" and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 1):
            raise ValueError(f"KL schedule 'linear': expected warmup_steps >= 1, received {self.warmup_steps!r}")
        if self.kind == "sigmoid" and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"KL schedule 'sigmoid': expected a positive rate, received {self.rate!r}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"KL schedule: expected a step >= 0, received {step}")
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":
            return min(1.0, (step + 1) / self.warmup_steps)
        x = -self.rate * (step - self.midpoint)
        weight = 1.0 / (1.0 + math.exp(x)) if x < 700 else 0.0
        return max(MIN_WEIGHT, weight)


@dataclass
class AnnealedTrainer(Trainer):
    """:class:`~ppl_models.infer.engine.Trainer` whose training steps call model and guide with
    ``kl_weight = kl_schedule(step)`` and ``word_keep`` (word dropout's keep rate); validation uses neither.

    :param kl_schedule: the :class:`KLSchedule`.
    :param word_keep: keep rate of the decoder inputs during training (1: no word dropout).
    """

    kl_schedule: KLSchedule = field(default_factory=KLSchedule)
    word_keep: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.word_keep <= 1.0:
            raise ValueError(f"word_keep: expected a keep rate in [0, 1], received {self.word_keep!r}")
        super().__post_init__()

    @property
    def kl_weight(self) -> float:
        return self.kl_schedule(self.step)

    def loss_kwargs(self) -> dict:
        return {"num_data": self.num_data, "kl_weight": self.kl_weight, "word_keep": self.word_keep}
