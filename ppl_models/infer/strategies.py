r"""Inference strategies of the lecture, for any model that declares its local latent sites.

From "inference as optimization" to "inference as prediction":

==================  ==========================================================================================
``svi-local``       joint SVI over :math:`\theta` and a stored :math:`\lambda_i` per training datapoint
                    (Hoffman et al. 2013) — the per-datapoint guide :mod:`guides.mean_field`, sparse rows
``svi-inner``       the lecture's algorithm: for each minibatch initialise :math:`\lambda_0`, take ``K``
                    gradient steps on :math:`\lambda` with :math:`\theta` fixed, then one :math:`\theta` step at
                    :math:`\lambda_K` (nothing per datapoint is stored)
``amortized``       :math:`\lambda = \mathrm{enc}_\phi(x)` — the VAE; joint step on :math:`\theta, \phi`
``semi-amortized``  :math:`\lambda_0 = \mathrm{enc}_\phi(x)`, then ``K`` refinement steps (Kim et al. 2018);
                    ``refine_grad="stop"``: :math:`\theta` is trained at :math:`\lambda_K`, :math:`\phi` at
                    :math:`\lambda_0`; ``refine_grad="end-to-end"``: the loss at :math:`\lambda_K` is
                    differentiated through the unrolled refinement to :math:`\theta` and :math:`\phi`
==================  ==========================================================================================

:math:`\lambda` rows follow :mod:`guides.families` (``[z_loc, softplus^{-1}(z_scale)]`` per continuous
site, logits per discrete site); a refinement step is plain gradient ascent on each datapoint's own
ELBO, :math:`\lambda \leftarrow \lambda + \alpha \nabla_\lambda \mathrm{ELBO}(x_i, \theta, \lambda)`, with
reparameterized gradients for continuous sites.

References:
    Hoffman, Blei, Wang & Paisley (2013), Stochastic Variational Inference.
    Kim, Wiseman, Miller, Sontag & Rush (2018), Semi-Amortized Variational Autoencoders.
    Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational Autoencoders.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional

import pyro
import torch
from pyro import poutine

from guides.families import row_size, site_distribution
from ppl_models.registry import UnknownNameError
from ppl_models.spec import ModelSpec, data_plate

__all__ = [
    "STRATEGIES",
    "REFINE_GRADS",
    "INNER_OPTIMIZERS",
    "guide_for_strategy",
    "explicit_guide",
    "initial_lambda",
    "refine",
    "RefiningGuide",
    "StopGradientStep",
    "make_strategy",
]

STRATEGIES = ("svi-local", "svi-inner", "amortized", "semi-amortized")
REFINE_GRADS = ("stop", "end-to-end")
INNER_OPTIMIZERS = ("sgd", "adam")


def guide_for_strategy(strategy: str) -> Optional[str]:
    """The guide a strategy trains (``None`` for ``svi-inner``, whose :math:`\\lambda` live per minibatch)."""
    if strategy not in STRATEGIES:
        raise UnknownNameError("strategy", strategy, STRATEGIES)
    if strategy == "svi-local":
        return "mean-field"
    if strategy == "svi-inner":
        return None
    # λ = enc(x) in the families' row format, so that amortized and semi-amortized share one encoder.
    return "amortized-mlp"


def explicit_guide(x: torch.Tensor, idx: torch.Tensor | None = None, *, spec: ModelSpec, lam: Dict[str, torch.Tensor],
                   num_data: int | None = None):
    r"""The mean-field guide with given variational parameters: ``lam[site]`` of shape ``(batch, row_size)``."""
    with data_plate(x, idx, num_data, name=spec.data_plate):
        for site in spec.local_latents:
            pyro.sample(site.name, site_distribution(site, lam[site.name]))


def initial_lambda(spec: ModelSpec, batch: int, init_scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """:math:`\\lambda_0` matching the standard prior: ``z_loc = 0``, ``z_scale = init_scale``; zero logits."""
    lam = {}
    raw = float(torch.log(torch.expm1(torch.tensor(init_scale))))
    for site in spec.local_latents:
        rows = torch.zeros(batch, row_size(site))
        if not site.is_discrete:
            rows[:, site.numel :] = raw
        lam[site.name] = rows
    return lam


def _batch_loss(model: Callable, spec: ModelSpec, elbo, lam, args, idx, num_data=None) -> torch.Tensor:
    guide = functools.partial(explicit_guide, spec=spec, lam=lam)
    return elbo.differentiable_loss(model, guide, *args, idx, num_data=num_data)


def refine(
    model: Callable,
    spec: ModelSpec,
    lam0: Dict[str, torch.Tensor],
    args: tuple,
    idx: torch.Tensor | None,
    *,
    num_steps: int,
    lr: float,
    elbo=None,
    create_graph: bool = False,
    max_grad_norm: float | None = 5.0,
    optimizer: str = "sgd",
) -> Dict[str, torch.Tensor]:
    r""":math:`\lambda_K` after ``num_steps`` gradient steps on each datapoint's ELBO, :math:`\theta` fixed.

    The loss is not scaled by ``num_data / batch``: datapoint :math:`i`'s rows get the gradient of its own
    ELBO whatever the batch size.  Only :math:`\lambda` is differentiated (``torch.autograd.grad``), so no
    parameter's ``.grad`` changes.

    ``optimizer="sgd"`` is the lecture's :math:`\lambda \leftarrow \lambda + \alpha \nabla_\lambda \mathrm{ELBO}`,
    each datapoint's gradient row clipped to norm ``max_grad_norm`` (as in Kim et al. 2018); with
    ``create_graph`` the steps stay differentiable (end-to-end semi-amortized training).
    ``optimizer="adam"`` takes Adam steps on :math:`\lambda` instead (not differentiable): with single-sample
    gradients on a trained decoder, plain steps jitter around the optimum at the noise floor, while Adam's
    averaged, normalised steps keep improving the ELBO.  Without ``create_graph`` the result is detached.
    """
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"refinement steps K: expected a non-negative integer, received {num_steps!r}")
    if optimizer not in INNER_OPTIMIZERS:
        raise UnknownNameError("inner optimizer", optimizer, INNER_OPTIMIZERS)
    if optimizer == "adam" and create_graph:
        raise ValueError("inner optimizer 'adam' is not differentiable; end-to-end refinement needs 'sgd'")
    elbo = elbo or pyro.infer.Trace_ELBO()
    names = list(lam0)
    if create_graph:
        lam = {n: v if v.requires_grad else v.detach().requires_grad_(True) for n, v in lam0.items()}
    else:
        lam = {n: v.detach().clone().requires_grad_(True) for n, v in lam0.items()}
    adam = torch.optim.Adam([lam[n] for n in names], lr=lr) if optimizer == "adam" else None
    with torch.enable_grad():
        for _ in range(num_steps):
            loss = _batch_loss(model, spec, elbo, lam, args, idx)
            grads = torch.autograd.grad(loss, [lam[n] for n in names], create_graph=create_graph)
            if adam is not None:
                for n, g in zip(names, grads):
                    lam[n].grad = g
                adam.step()
                continue
            if max_grad_norm is not None:
                grads = [g * (max_grad_norm / (g.norm(dim=-1, keepdim=True) + 1e-12)).clamp(max=1.0) for g in grads]
            lam = {n: lam[n] - lr * g for n, g in zip(names, grads)}
            if not create_graph:
                lam = {n: v.detach().requires_grad_(True) for n, v in lam.items()}
    return lam if create_graph else {n: v.detach() for n, v in lam.items()}


class RefiningGuide:
    r"""A guide that optimizes its :math:`\lambda` for the batch it is given, then samples from :math:`q_{\lambda_K}`.

    ``guide(x, idx=None, *, num_data=None)`` — the model's signature.  :math:`\lambda_0` is
    :func:`initial_lambda` (``svi-inner``) or ``encoder(x)`` (``semi-amortized``; the encoder is registered as
    ``"encoder"``); then ``num_steps`` steps of :func:`refine` with the model's parameters fixed, hidden from
    any enclosing handler (an ELBO's trace, the evaluator's sample plate).  With ``create_graph`` the
    refinement is differentiated end to end.  Outside autograd (evaluation) the :math:`\lambda_K` of the last
    batch is reused for the same ``x`` object, so chunked importance sampling refines each batch once.
    """

    def __init__(self, model: Callable, spec: ModelSpec, *, num_steps: int, lr: float,
                 encoder: Optional[torch.nn.Module] = None, create_graph: bool = False, init_scale: float = 1.0,
                 optimizer: str = "sgd"):
        self.model, self.spec, self.num_steps, self.lr = model, spec, num_steps, lr
        self.encoder, self.create_graph, self.init_scale, self.optimizer = encoder, create_graph, init_scale, optimizer
        self._cache = None

    def lambda_for(self, x: torch.Tensor, idx: torch.Tensor | None) -> Dict[str, torch.Tensor]:
        cacheable = not torch.is_grad_enabled()
        if cacheable and self._cache is not None and self._cache[0] is x and self._cache[1] is idx:
            return self._cache[2]
        if self.encoder is not None:
            pyro.module("encoder", self.encoder)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.create_graph):
                lam0 = self.encoder(x)
        else:
            lam0 = initial_lambda(self.spec, x.shape[0], self.init_scale)
        with poutine.block():
            create_graph = self.create_graph and torch.is_grad_enabled()
            lam = refine(self.model, self.spec, lam0, (x,), idx, num_steps=self.num_steps, lr=self.lr,
                         create_graph=create_graph, optimizer="sgd" if create_graph else self.optimizer)
        self._cache = (x, idx, lam) if cacheable else None
        return lam

    def __call__(self, x: torch.Tensor, idx: torch.Tensor | None = None, *, num_data: int | None = None):
        explicit_guide(x, idx, spec=self.spec, lam=self.lambda_for(x, idx), num_data=num_data)


class StopGradientStep:
    r"""The ``semi-amortized`` step with ``refine_grad="stop"`` (Kim et al. 2018, Algorithm 1 without the
    second-order terms): :math:`\theta` gets the gradient of the ELBO at :math:`\lambda_K`, :math:`\phi` that of
    the ELBO at :math:`\lambda_0 = \mathrm{enc}_\phi(x)`."""

    def __init__(self, guide: RefiningGuide):
        self.guide = guide

    def __call__(self, trainer, args, idx) -> float:
        model, spec, elbo, kwargs = trainer.model, self.guide.spec, trainer._elbo, trainer._loss_kwargs()
        encoder = self.guide.encoder
        pyro.module("encoder", encoder)
        lam0 = encoder(args[0])
        with poutine.block():
            lam_k = refine(model, spec, lam0, args, idx, num_steps=self.guide.num_steps, lr=self.guide.lr,
                           optimizer=self.guide.optimizer)
        trainer._optim.zero_grad()
        loss_k = _batch_loss(model, spec, elbo, lam_k, args, idx, **kwargs)
        value = trainer._check_loss(loss_k, args, idx)
        loss_k.backward()  # θ only: λ_K is a constant
        encoder_params = list(encoder.parameters())
        loss_0 = _batch_loss(model, spec, elbo, lam0, args, idx, **kwargs)
        for p, g in zip(encoder_params, torch.autograd.grad(loss_0, encoder_params, allow_unused=True)):
            p.grad = g
        trainer._optim.step()
        return value


def make_strategy(name: str, model: Callable, instance_guide: Callable, spec: ModelSpec,
                  modules: Dict[str, torch.nn.Module], *, num_steps: int = 20, lr: float = 0.1,
                  refine_grad: str = "stop", optimizer: str = "sgd"):
    """``(guide, step)`` for the strategy ``name``: the guide the engine trains and evaluates, and the step
    rule (``None``: the engine's joint step on every parameter)."""
    guide_for_strategy(name)  # validates the name
    if refine_grad not in REFINE_GRADS:
        raise UnknownNameError("refine_grad", refine_grad, REFINE_GRADS)
    if optimizer not in INNER_OPTIMIZERS:
        raise UnknownNameError("inner optimizer", optimizer, INNER_OPTIMIZERS)
    if name in ("svi-local", "amortized"):
        return instance_guide, None
    if name == "svi-inner":
        return RefiningGuide(model, spec, num_steps=num_steps, lr=lr, optimizer=optimizer), None
    if "encoder" not in modules:
        raise ValueError(
            f"strategy 'semi-amortized' needs an amortized guide with an 'encoder'; the guide has {sorted(modules)}"
        )
    guide = RefiningGuide(model, spec, num_steps=num_steps, lr=lr, encoder=modules["encoder"],
                          create_graph=refine_grad == "end-to-end", optimizer=optimizer)
    return guide, (StopGradientStep(guide) if refine_grad == "stop" else None)
