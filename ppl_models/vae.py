r"""The lecture's deep generative model of MNIST digits (a VAE's decoder).

Generative story, for each datapoint :math:`i = 1, \dots, N`:

1. :math:`z^{(i)} \sim \mathcal{N}(0, I_{z\_dim})`
2. :math:`h^{(i)} = \mathrm{MLP}_\theta(z^{(i)})`, hidden layers of sizes ``hidden_dims`` with
   ``activation`` ReLU (the lecture's :math:`h = \mathrm{ReLU}(W_1 z)` is ``hidden_dims=(400,)``) or tanh
   (Burda et al. 2016's networks)
3. :math:`x^{(i)} \sim \mathrm{Bernoulli}(\sigma(W_2 h^{(i)} + b_2))`, independently per pixel

Guides are in :mod:`ppl_models.guides.vae`: an amortized MLP encoder (the VAE) and a
per-datapoint mean-field guide (SVI with a :math:`\lambda_i` per datapoint).

References:
    Kingma & Welling (2014), Auto-Encoding Variational Bayes.
    Rezende, Mohamed & Wierstra (2014), Stochastic Backpropagation and
    Approximate Inference in Deep Generative Models.
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders (tanh networks, section 5).
    Pyro ``examples/vae/vae.py``; NumPyro ``examples/vae.py``.
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite, check_tensor, data_plate

__all__ = ["Decoder", "model", "make_spec", "build"]


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, received {activation!r}")


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` (``"relu"`` or ``"tanh"``) between them (none
    after the last)."""
    check_activation(activation)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """:math:`z \\mapsto` Bernoulli logits of the pixels.

    Input ``z``: ``(..., z_dim)``; output logits: ``(..., x_dim)``.
    """

    def __init__(self, z_dim: int = 20, hidden_dims: Sequence[int] = (400,), x_dim: int = 784,
                 activation: str = "relu"):
        super().__init__()
        self.z_dim, self.x_dim = z_dim, x_dim
        self.net = mlp([z_dim, *hidden_dims, x_dim], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def make_spec(z_dim: int = 20, x_dim: int = 784) -> ModelSpec:
    return ModelSpec(
        name="vae",
        observed=ObservedSite("x", (x_dim,), constraints.unit_interval),
        data_plate="data",
        local_latents=(LatentSite("z", (z_dim,), constraints.real),),
    )


def model(x: torch.Tensor, idx: torch.Tensor | None = None, *, decoder: Decoder, num_data: int | None = None):
    """The generative story above.

    :param x: pixels in [0, 1], shape ``(batch, x_dim)``.
    :param idx: indices of the batch in the full data set, shape ``(batch,)``;
        ``None`` when ``x`` is the whole data set.
    :param decoder: the network :math:`\\theta`, registered as ``"decoder"``.
    :param num_data: size :math:`N` of the full data set (for the ELBO's N/batch scale).
    """
    check_tensor("x", x, event_shape=(decoder.x_dim,), support=constraints.unit_interval)
    pyro.module("decoder", decoder)
    with data_plate(x, idx, num_data):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([decoder.z_dim]).to_event(1))
        logits = decoder(z)
        # validate_args=False: grey-level pixels in [0, 1] are allowed (their BCE is well defined).
        pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x)


def build(z_dim: int = 20, hidden_dims: Sequence[int] = (400,), x_dim: int = 784,
          activation: str = "relu") -> ModelParts:
    """The declared structure and the networks (``decoder``) for given sizes and hidden ``activation``."""
    return ModelParts(spec=make_spec(z_dim, x_dim),
                      modules={"decoder": Decoder(z_dim, hidden_dims, x_dim, activation)})


register_model("vae", model=model, build=build)
