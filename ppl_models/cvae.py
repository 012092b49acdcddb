r"""The conditional VAE for structured output prediction (Sohn, Lee & Yan 2015), and its deterministic baseline.

Task (:mod:`ppl_models.data.quadrants`): from the observed quadrants :math:`x` of an MNIST digit predict
the missing ones :math:`y` (``num_missing`` grey levels in [0, 1]).  For each datapoint :math:`i`:

``cvae`` — the conditional deep generative model, built on top of the baseline as in Pyro's ``examples/cvae``:

1. :math:`\hat y_i = \sigma(\mathrm{NN}(x_i))`, the trained baseline's guess, held fixed (optional,
   ``baseline_net``; in a run, ``[model] baseline_run`` names the baseline's run directory and
   :mod:`ppl_models.tasks.cvae` loads it); :math:`\tilde x_i` = :math:`x_i` with its missing pixels filled by
   :math:`\hat y_i` (without a baseline they keep the value ``-1``)
2. prior network: :math:`z_i \mid x_i \sim \mathcal{N}(z\_loc(\tilde x_i), \mathrm{diag}\,z\_scale(\tilde x_i)^2)`,
   :math:`z_i \in \mathbb{R}^{z\_dim}`
3. generation network: :math:`y_i \mid x_i, z_i \sim \mathrm{Bernoulli}(\sigma(\ell_i))`, independently per
   missing pixel, with logits :math:`\ell_i = g(z_i, \tilde x_i)`, or
   :math:`\ell_i = \mathrm{NN}(x_i) + g(z_i, \tilde x_i)` with a baseline and ``residual = true``
   (:math:`g` starts at 0: training starts from the baseline's predictions).  A "Bernoulli" likelihood of
   grey levels, :math:`\log p = -\mathrm{BCE}`, as in Pyro's example.  With ``condition_generation = false``
   :math:`g` reads :math:`z_i` only (Pyro's decoder).

The recognition network :math:`q_\phi(z_i \mid x_i, y_i)` is in :mod:`ppl_models.guides.cvae`.  The conditional
log-likelihood :math:`\log p(y_i \mid x_i) = \log \int p(z \mid x_i)\, p(y_i \mid x_i, z)\, dz` is estimated by
importance sampling with :math:`q_\phi` as proposal (:func:`ppl_models.infer.evaluate.evaluate`).

``cvae-baseline`` — the deterministic neural network:

1. :math:`y_i \mid x_i \sim \mathrm{Bernoulli}(\sigma(\mathrm{NN}(x_i)))` per missing pixel; no latent
   variable, so its log-likelihood is exact (the masked binary cross-entropy of Pyro's ``MaskedBCELoss``).
   Its guide is ``"none"`` in :mod:`ppl_models.guides.cvae` (no latent sites).

Shapes: ``x_obs`` is ``(batch, side * side)`` with ``-1`` at the missing pixels, ``y`` is ``(batch, num_missing)``
(the quadrant layout of :mod:`ppl_models.encodings`).

References:
    Sohn, Lee & Yan (2015), Learning Structured Output Representation using Deep Conditional
    Generative Models, NeurIPS.
    Pyro ``examples/cvae`` and the tutorial ``cvae.ipynb`` (networks of 500-500 ReLU units, z in R^200).
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from ppl_models.encodings import MASKED, complete, missing_mask
from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite, ShapeError, check_tensor, data_plate
from ppl_models.vae import mlp

__all__ = [
    "BaselineNet",
    "GaussianNet",
    "GenerationNet",
    "check_inputs",
    "fill_missing",
    "model",
    "baseline_model",
    "build",
    "build_baseline",
    "complete_images",
]


class _Layout(nn.Module):
    """The quadrant layout: image side and the boolean mask of missing pixels (a buffer)."""

    def __init__(self, num_quadrant_inputs: int, side: int):
        super().__init__()
        self.num_quadrant_inputs, self.side = num_quadrant_inputs, side
        self.register_buffer("mask", missing_mask(num_quadrant_inputs, side), persistent=False)
        self.x_dim, self.num_missing = side * side, int(self.mask.sum())


class BaselineNet(_Layout):
    """Deterministic NN: ``x_obs`` ``(batch, x_dim)`` -> Bernoulli logits of the missing pixels
    ``(batch, num_missing)``."""

    def __init__(self, num_quadrant_inputs: int = 1, hidden_dims: Sequence[int] = (500, 500), side: int = 28):
        super().__init__(num_quadrant_inputs, side)
        self.net = nn.Sequential(
            mlp([self.x_dim, *hidden_dims]), nn.ReLU(), nn.Linear(hidden_dims[-1], self.num_missing)
        )

    def forward(self, x_obs: torch.Tensor) -> torch.Tensor:
        return self.net(x_obs)


class GaussianNet(_Layout):
    """An image ``(batch, x_dim)`` -> ``(z_loc, z_scale)``, each ``(batch, z_dim)`` (prior and recognition networks)."""

    def __init__(
        self, num_quadrant_inputs: int = 1, hidden_dims: Sequence[int] = (500, 500), z_dim: int = 200, side: int = 28
    ):
        super().__init__(num_quadrant_inputs, side)
        self.z_dim = z_dim
        self.body = nn.Sequential(mlp([self.x_dim, *hidden_dims]), nn.ReLU())
        self.z_loc = nn.Linear(hidden_dims[-1], z_dim)
        self.z_scale = nn.Linear(hidden_dims[-1], z_dim)

    def forward(self, image: torch.Tensor):
        h = self.body(image)
        return self.z_loc(h), F.softplus(self.z_scale(h)) + 1e-6


class GenerationNet(_Layout):
    r""":math:`(z, \tilde x)` -> Bernoulli logits of the missing pixels.

    ``z``: ``(..., batch, z_dim)``; ``x_filled``: ``(batch, x_dim)``; output ``(..., batch, num_missing)``.
    The first layer is :math:`W_z z + W_x \tilde x + b` (:math:`W_x \tilde x` computed once per datapoint,
    not per draw of :math:`z`); ``condition_generation=False`` drops :math:`W_x` (Pyro's decoder).
    """

    def __init__(
        self,
        num_quadrant_inputs: int = 1,
        hidden_dims: Sequence[int] = (500, 500),
        z_dim: int = 200,
        side: int = 28,
        condition_generation: bool = True,
        residual: bool = False,
    ):
        super().__init__(num_quadrant_inputs, side)
        self.residual = residual
        self.z_in = nn.Linear(z_dim, hidden_dims[0])
        self.x_in = nn.Linear(self.x_dim, hidden_dims[0], bias=False) if condition_generation else None
        self.body = nn.Sequential(nn.ReLU(), mlp([*hidden_dims, self.num_missing]))

    def zero_output(self) -> "GenerationNet":
        """Start :math:`g` at 0 (the residual form starts from the baseline's logits)."""
        nn.init.zeros_(self.body[-1][-1].weight)
        nn.init.zeros_(self.body[-1][-1].bias)
        return self

    def forward(self, z: torch.Tensor, x_filled: torch.Tensor) -> torch.Tensor:
        h = self.z_in(z)
        if self.x_in is not None:
            h = h + self.x_in(x_filled)
        return self.body(h)


def check_inputs(x_obs: torch.Tensor, y: torch.Tensor | None, layout: _Layout) -> None:
    """One :class:`ShapeError` naming the site if ``x_obs`` / ``y`` do not fit the quadrant layout."""
    check_tensor("x_obs", x_obs, event_shape=(layout.x_dim,))
    missing = x_obs[:, layout.mask]
    if missing.numel() and not bool((missing == MASKED).all()):
        bad = (missing != MASKED).nonzero()[0].tolist()
        raise ShapeError(
            f"site 'x_obs': expected {MASKED} at the {layout.num_missing} missing pixels of "
            f"{layout.num_quadrant_inputs} observed quadrant(s), received {missing[tuple(bad)].item()} at row {bad[0]}"
        )
    check_tensor("x_obs", x_obs[:, ~layout.mask], support=constraints.unit_interval)
    if y is not None:
        check_tensor("y", y, event_shape=(layout.num_missing,), support=constraints.unit_interval)
        if y.shape[0] != x_obs.shape[0]:
            raise ShapeError(f"site 'y': expected batch size {x_obs.shape[0]} (as x_obs), received {y.shape[0]}")


@torch.no_grad()
def fill_missing(x_obs: torch.Tensor, baseline_net: BaselineNet | None):
    r""":math:`(\tilde x, \mathrm{NN}(x))`: ``x_obs`` with the missing pixels replaced by the baseline's guess,
    shape ``(batch, x_dim)``, and the baseline's logits ``(batch, num_missing)`` (fixed, no gradient);
    ``(x_obs, None)`` without a baseline."""
    if baseline_net is None:
        return x_obs, None
    base_logits = baseline_net(x_obs)
    return complete(x_obs, torch.sigmoid(base_logits), baseline_net.mask), base_logits


def model(
    x_obs: torch.Tensor,
    y: torch.Tensor | None = None,
    idx: torch.Tensor | None = None,
    *,
    prior_net: GaussianNet,
    generation_net: GenerationNet,
    baseline_net: BaselineNet | None = None,
    num_data: int | None = None,
):
    """The CVAE's generative story above.

    :param x_obs: observed quadrants, shape ``(batch, x_dim)``, ``-1`` at the missing pixels.
    :param y: missing pixels' grey levels, shape ``(batch, num_missing)``; ``None`` samples them.
    :param idx: indices of the batch in the data set, shape ``(batch,)``.
    :param prior_net: :math:`p_\\theta(z \\mid x)`, registered as ``"prior_net"``.
    :param generation_net: :math:`p_\\theta(y \\mid x, z)`, registered as ``"generation_net"``.
    :param baseline_net: the trained baseline, held fixed (not registered with Pyro: not trained).
    :param num_data: size of the full data set.
    :return: the Bernoulli logits of ``y``, shape ``(..., batch, num_missing)``.
    """
    check_inputs(x_obs, y, prior_net)
    pyro.module("prior_net", prior_net)
    pyro.module("generation_net", generation_net)
    x_filled, base_logits = fill_missing(x_obs, baseline_net)
    z_loc, z_scale = prior_net(x_filled)
    with data_plate(x_obs, idx, num_data):
        z = pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))
        logits = generation_net(z, x_filled)
        if generation_net.residual and base_logits is not None:
            logits = logits + base_logits
        # validate_args=False: grey levels in [0, 1] are scored by -BCE, as in Pyro's example.
        pyro.sample("y", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=y)
    return logits


def baseline_model(
    x_obs: torch.Tensor,
    y: torch.Tensor | None = None,
    idx: torch.Tensor | None = None,
    *,
    baseline_net: BaselineNet,
    num_data: int | None = None,
):
    """The deterministic baseline as a Pyro model (no latent sites); arguments as :func:`model`."""
    check_inputs(x_obs, y, baseline_net)
    pyro.module("baseline_net", baseline_net)
    logits = baseline_net(x_obs)
    with data_plate(x_obs, idx, num_data):
        pyro.sample("y", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=y)
    return logits


def _spec(name: str, layout: _Layout, z_dim: int | None) -> ModelSpec:
    latents = () if z_dim is None else (LatentSite("z", (z_dim,), constraints.real),)
    return ModelSpec(name, ObservedSite("y", (layout.num_missing,), constraints.unit_interval), "data", latents)


def build(
    num_quadrant_inputs: int = 1,
    z_dim: int = 200,
    hidden_dims: Sequence[int] = (500, 500),
    side: int = 28,
    condition_generation: bool = True,
    baseline_net: BaselineNet | None = None,
    residual: bool = True,
) -> ModelParts:
    """Networks of the CVAE (``prior_net``, ``generation_net`` and, if given, the trained ``baseline_net``, held
    fixed; ``residual``: with a baseline, the generation network adds to the baseline's logits and starts at 0)."""
    if baseline_net is not None:
        if not isinstance(baseline_net, BaselineNet):
            raise TypeError(f"model 'cvae' baseline_net: expected a trained BaselineNet, received "
                            f"{type(baseline_net).__name__}")
        if (baseline_net.num_quadrant_inputs, baseline_net.side) != (num_quadrant_inputs, side):
            raise ValueError(
                f"model 'cvae' baseline_net: expected a baseline for {num_quadrant_inputs} observed quadrant(s) of "
                f"side {side}, received one for {baseline_net.num_quadrant_inputs} of side {baseline_net.side}"
            )
    prior_net = GaussianNet(num_quadrant_inputs, hidden_dims, z_dim, side)
    residual = bool(residual and baseline_net is not None)
    generation_net = GenerationNet(num_quadrant_inputs, hidden_dims, z_dim, side, condition_generation, residual)
    if residual:
        generation_net.zero_output()
    modules = {"prior_net": prior_net, "generation_net": generation_net}
    if baseline_net is not None:
        modules["baseline_net"] = baseline_net
    return ModelParts(spec=_spec("cvae", prior_net, z_dim), modules=modules)


def build_baseline(num_quadrant_inputs: int = 1, hidden_dims: Sequence[int] = (500, 500), side: int = 28) -> ModelParts:
    """The baseline network ``baseline_net``."""
    net = BaselineNet(num_quadrant_inputs, hidden_dims, side)
    return ModelParts(spec=_spec("cvae-baseline", net, None), modules={"baseline_net": net})


@torch.no_grad()
def complete_images(x_obs: torch.Tensor, modules: dict, num_samples: int = 1) -> torch.Tensor:
    """Completions of ``x_obs`` ``(batch, x_dim)``: the missing pixels' probabilities written into the image.

    With ``prior_net`` in ``modules`` (the CVAE): ``num_samples`` draws :math:`z \\sim p(z \\mid x)`, shape
    ``(num_samples, batch, x_dim)``; otherwise the baseline's single prediction, shape ``(1, batch, x_dim)``.
    """
    if "prior_net" in modules:
        prior_net, generation_net = modules["prior_net"], modules["generation_net"]
        check_inputs(x_obs, None, prior_net)
        x_filled, base_logits = fill_missing(x_obs, modules.get("baseline_net"))
        z_loc, z_scale = prior_net(x_filled)
        z = dist.Normal(z_loc, z_scale).sample((num_samples,))
        logits = generation_net(z, x_filled)
        if generation_net.residual and base_logits is not None:
            logits = logits + base_logits
        probs = torch.sigmoid(logits)
        return complete(x_obs, probs, prior_net.mask)
    net = modules["baseline_net"]
    check_inputs(x_obs, None, net)
    return complete(x_obs, torch.sigmoid(net(x_obs)), net.mask).unsqueeze(0)


register_model("cvae", model=model, build=build)
register_model("cvae-baseline", model=baseline_model, build=build_baseline)
