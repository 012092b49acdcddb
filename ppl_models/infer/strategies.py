r"""Inference strategies of the lecture, for any model that declares its local latent sites.

From "inference as optimization" to "inference as prediction":

==================  ==========================================================================================
``svi-local``       joint SVI over :math:`\theta` and a stored :math:`\lambda_i` per training datapoint
                    (Hoffman et al. 2013) — the per-datapoint guide :mod:`ppl_models.guides.mean_field`, sparse rows
``svi-inner``       the lecture's algorithm: for each minibatch initialise :math:`\lambda_0`, take ``K``
                    gradient steps on :math:`\lambda` with :math:`\theta` fixed, then one :math:`\theta` step at
                    :math:`\lambda_K` (nothing per datapoint is stored)
``amortized``       :math:`\lambda = \mathrm{enc}_\phi(x)` — the VAE; joint step on :math:`\theta, \phi`
``semi-amortized``  :math:`\lambda_0 = \mathrm{enc}_\phi(x)`, then ``K`` refinement steps (Kim et al. 2018);
                    ``refine_grad="stop"``: :math:`\theta` is trained at :math:`\lambda_K`, :math:`\phi` at
                    :math:`\lambda_0`; ``refine_grad="end-to-end"``: the loss at :math:`\lambda_K` is
                    differentiated through the unrolled refinement to :math:`\theta` and :math:`\phi`
==================  ==========================================================================================

:math:`\lambda` rows follow :mod:`ppl_models.families` (``[z_loc, softplus^{-1}(z_scale)]`` per continuous
site, logits per discrete site); a refinement step is plain gradient ascent on each datapoint's own
ELBO, :math:`\lambda \leftarrow \lambda + \alpha \nabla_\lambda \mathrm{ELBO}(x_i, \theta, \lambda)` (the
lecture's; each datapoint's gradient row clipped to norm 5), or an Adam step on :math:`\lambda`, with
reparameterized gradients for continuous sites.

The inner loop (:class:`InnerLoop`: steps ``K``, step rule, step size) depends on where :math:`\lambda_0`
starts and what the result is for, so each use has its own default (:func:`inner_loop`, table
:data:`INNER_LOOPS`), chosen by a sweep on MNIST (VAE 784-400-20, single-sample gradients, one thread;
the numbers are in the closing note of issue 3):

* ``svi-inner`` training, :math:`\lambda_0` = the prior: ``K = 10`` plain steps, :math:`\alpha` = 1.0 decaying
  to 0.1.  After the same 400 :math:`\theta` steps it gave the best test ELBO at :math:`\lambda_K` and the best
  test IWAE (-116.5 nats; plain :math:`\alpha` 0.3-0.7: -117.6 to -119.3, :math:`\alpha` 0.1: -136; Adam on
  :math:`\lambda`, lr 0.05-0.5: -131 to -159); at an equal number of decoder passes ``K = 5`` (-119.0) and
  ``K = 20`` (-124.4) were worse.
* ``semi-amortized``, :math:`\lambda_0 = \mathrm{enc}(x)` (training, test images, the amortization gap):
  ``K = 10`` plain steps, :math:`\alpha = 0.02`.  From the encoder's ELBO (-98.4) they gain 1.8 nats in 10
  steps, 2.3 in 20 and 3.1 in 100, as much as Adam with lr 0.03, and they are differentiable (end to end);
  plain steps with :math:`\alpha \ge 0.1` end below the encoder's ELBO.
* ``test``, test images' :math:`\lambda` for ``svi-local`` and ``svi-inner`` (from the prior): ``K = 300``
  Adam steps, lr 0.2 decaying to 0.01: -94.9 on a decoder where 300 constant-lr Adam steps reach -95.6
  (lr 0.05) or -96.3 (lr 0.1), and lr 0.1 decaying to 0.01 reaches -95.3 in 300 steps, -94.8 in 500; on the
  conjugate linear-Gaussian model it leaves under 0.05 nats of the optimal mean-field ELBO.  (Its
  plain-step variant is not measured on MNIST.)

``svi-local`` has no inner loop, but its stored :math:`\lambda_i` move only when their datapoint is in the
batch, once per epoch: they get their own Adam step size, ``local_lr`` = :data:`LOCAL_LR` = 0.1.  After the
same 1407 :math:`\theta` steps (3 epochs) the test IWAE (test :math:`\lambda` from the prior as below) was
-186.0 nats with the networks' lr 1e-3 for :math:`\lambda_i` too, -148.5 with 0.01, -115.5 with 0.1, -123.4 with
0.3 and -177.4 with 1.0.

Any field can be set per run: ``[train] inner_steps``, ``inner_lr``, ``inner_optimizer``, ``inner_lr_decay``,
``local_lr`` and ``[evaluate] refine_steps``.

References:
    Hoffman, Blei, Wang & Paisley (2013), Stochastic Variational Inference.
    Kim, Wiseman, Miller, Sontag & Rush (2018), Semi-Amortized Variational Autoencoders.
    Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational Autoencoders.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional

import pyro
import torch
from pyro import poutine

from ppl_models.families import row_size, site_distribution
from ppl_models.registry import UnknownNameError
from ppl_models.spec import ModelSpec, data_plate

__all__ = [
    "STRATEGIES",
    "REFINE_GRADS",
    "INNER_OPTIMIZERS",
    "INNER_USES",
    "LOCAL_LR",
    "INNER_LOOPS",
    "InnerLoop",
    "inner_loop",
    "guide_for_strategy",
    "explicit_guide",
    "initial_lambda",
    "refine",
    "RefiningGuide",
    "LocalStep",
    "StopGradientStep",
    "RefinedJointStep",
    "INNER_LOOP_STRATEGIES",
    "step_rule",
    "make_strategy",
    "inference_guide",
]

STRATEGIES = ("svi-local", "svi-inner", "amortized", "semi-amortized")
REFINE_GRADS = ("stop", "end-to-end")
INNER_OPTIMIZERS = ("sgd", "adam")
INNER_USES = ("svi-inner", "semi-amortized", "test")
#: Strategies whose step optimizes λ inside it (an inner loop): not one ELBO evaluation, so neither the fast path
#: (which captures one) nor data-parallel training (which splits one) applies; each says so (a notice, an error).
INNER_LOOP_STRATEGIES = ("svi-inner", "semi-amortized")
#: svi-local's step size for its stored λ_i (SparseAdam), measured: see the module docstring.
LOCAL_LR = 0.1


@dataclass(frozen=True)
class InnerLoop:
    r"""How :math:`\lambda` is optimized with :math:`\theta` fixed: ``num_steps`` steps of ``optimizer``
    (``"sgd"``: the lecture's plain, clipped gradient steps; ``"adam"``: Adam on :math:`\lambda`) with step size
    ``lr``, decaying geometrically to ``lr * lr_decay`` at the last step (``lr_decay = 1``: constant)."""

    num_steps: int
    lr: float
    optimizer: str = "sgd"
    lr_decay: float = 1.0

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 0:
            raise ValueError(f"inner loop steps K: expected a non-negative integer, received {self.num_steps!r}")
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and math.isfinite(self.lr)
                and self.lr > 0):
            raise ValueError(f"inner loop lr: expected a positive number, received {self.lr!r}")
        if self.optimizer not in INNER_OPTIMIZERS:
            raise UnknownNameError("inner optimizer", self.optimizer, INNER_OPTIMIZERS)
        if not (isinstance(self.lr_decay, (int, float)) and not isinstance(self.lr_decay, bool)
                and 0 < self.lr_decay <= 1):
            raise ValueError(f"inner loop lr_decay: expected a number in (0, 1], received {self.lr_decay!r}")

    def step_size(self, k: int) -> float:
        """The step size of step ``k = 0, ..., num_steps - 1``."""
        if self.lr_decay == 1:
            return float(self.lr)
        return float(self.lr) * float(self.lr_decay) ** (k / max(1, self.num_steps - 1))


#: Default inner loops by (use, optimizer), chosen by the sweep in the module docstring; the first optimizer
#: listed for a use is its default.  The alternatives are the best of the sweep for that rule (svi-inner Adam,
#: semi-amortized Adam), except the test-time plain steps, which are not measured on MNIST.
INNER_LOOPS: Dict[str, Dict[str, InnerLoop]] = {
    "svi-inner": {"sgd": InnerLoop(10, 1.0, "sgd", lr_decay=0.1), "adam": InnerLoop(10, 0.5, "adam")},
    "semi-amortized": {"sgd": InnerLoop(10, 0.02, "sgd"), "adam": InnerLoop(10, 0.03, "adam")},
    "test": {"adam": InnerLoop(300, 0.2, "adam", lr_decay=0.05), "sgd": InnerLoop(300, 0.5, "sgd", lr_decay=0.02)},
}


def inner_loop(use: str, *, num_steps: int | None = None, lr: float | None = None, optimizer: str | None = None,
               lr_decay: float | None = None) -> InnerLoop:
    """The default :class:`InnerLoop` of ``use`` (one of :data:`INNER_USES`) for ``optimizer`` (``None``: the
    use's default optimizer), with every field that is not ``None`` replaced."""
    if use not in INNER_LOOPS:
        raise UnknownNameError("inner loop use", use, INNER_LOOPS)
    defaults = INNER_LOOPS[use]
    if optimizer is None:
        optimizer = next(iter(defaults))
    if optimizer not in defaults:
        raise UnknownNameError("inner optimizer", optimizer, INNER_OPTIMIZERS)
    given = {"num_steps": num_steps, "lr": lr, "lr_decay": lr_decay}
    return replace(defaults[optimizer], **{k: v for k, v in given.items() if v is not None})


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
    lr_decay: float = 1.0,
) -> Dict[str, torch.Tensor]:
    r""":math:`\lambda_K` after ``num_steps`` gradient steps on each datapoint's ELBO, :math:`\theta` fixed.

    The loss is not scaled by ``num_data / batch``: datapoint :math:`i`'s rows get the gradient of its own
    ELBO whatever the batch size.  Only :math:`\lambda` is differentiated (``torch.autograd.grad``), so no
    parameter's ``.grad`` changes.

    ``optimizer="sgd"`` is the lecture's :math:`\lambda \leftarrow \lambda + \alpha \nabla_\lambda \mathrm{ELBO}`,
    each datapoint's gradient row clipped to norm ``max_grad_norm`` (as in Kim et al. 2018); with
    ``create_graph`` the steps stay differentiable (end-to-end semi-amortized training).
    ``optimizer="adam"`` takes Adam steps on :math:`\lambda` instead (not differentiable); its per-coordinate
    normalised steps suit many steps from the prior (test-time :math:`\lambda`).  The step size decays
    geometrically from ``lr`` to ``lr * lr_decay`` (:class:`InnerLoop`).  Without ``create_graph`` the result
    is detached.  Which rule and size suit which use: the module docstring.
    """
    loop = InnerLoop(num_steps, lr, optimizer, lr_decay)  # validates every field
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
        for k in range(num_steps):
            step_size = loop.step_size(k)
            loss = _batch_loss(model, spec, elbo, lam, args, idx)
            grads = torch.autograd.grad(loss, [lam[n] for n in names], create_graph=create_graph)
            if adam is not None:
                adam.param_groups[0]["lr"] = step_size
                for n, g in zip(names, grads):
                    lam[n].grad = g
                adam.step()
                continue
            if max_grad_norm is not None:
                grads = [g * (max_grad_norm / (g.norm(dim=-1, keepdim=True) + 1e-12)).clamp(max=1.0) for g in grads]
            lam = {n: lam[n] - step_size * g for n, g in zip(names, grads)}
            if not create_graph:
                lam = {n: v.detach().requires_grad_(True) for n, v in lam.items()}
    return lam if create_graph else {n: v.detach() for n, v in lam.items()}


class RefiningGuide:
    r"""A guide that optimizes its :math:`\lambda` for the batch it is given, then samples from :math:`q_{\lambda_K}`.

    ``guide(x, idx=None, *, num_data=None)`` — the model's signature.  :math:`\lambda_0` is
    :func:`initial_lambda` (``svi-inner``, test-time :math:`\lambda`) or ``encoder(x)`` (``semi-amortized``; the
    encoder is registered as ``"encoder"``); then the steps of :func:`refine` (``num_steps``, ``lr``,
    ``optimizer``, ``lr_decay``, or one :class:`InnerLoop` as ``loop``) with the model's parameters fixed, hidden
    from any enclosing handler (an ELBO's trace, the evaluator's sample plate).  With ``create_graph`` the
    refinement is differentiated end to end.  Outside autograd (evaluation) the :math:`\lambda_K` of the last
    batch is reused for the same ``x`` object, so chunked importance sampling refines each batch once.
    """

    def __init__(self, model: Callable, spec: ModelSpec, *, num_steps: int | None = None, lr: float | None = None,
                 encoder: Optional[torch.nn.Module] = None, create_graph: bool = False, init_scale: float = 1.0,
                 optimizer: str = "sgd", lr_decay: float = 1.0, loop: InnerLoop | None = None):
        if loop is None:
            if num_steps is None or lr is None:
                raise ValueError("RefiningGuide: expected num_steps and lr, or an InnerLoop as loop")
            loop = InnerLoop(num_steps, lr, optimizer, lr_decay)
        if create_graph and loop.optimizer != "sgd":
            raise ValueError(
                f"inner optimizer {loop.optimizer!r} is not differentiable; end-to-end refinement needs 'sgd'"
            )
        self.model, self.spec, self.loop = model, spec, loop
        self.encoder, self.create_graph, self.init_scale = encoder, create_graph, init_scale
        self._cache = None

    @property
    def num_steps(self) -> int:
        return self.loop.num_steps

    def refine(self, lam0, args, idx, create_graph: bool = False) -> Dict[str, torch.Tensor]:
        """:func:`refine` with this guide's inner loop."""
        loop = self.loop
        return refine(self.model, self.spec, lam0, args, idx, num_steps=loop.num_steps, lr=loop.lr,
                      create_graph=create_graph, optimizer=loop.optimizer, lr_decay=loop.lr_decay)

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
            lam = self.refine(lam0, (x,), idx, create_graph=self.create_graph and torch.is_grad_enabled())
        self._cache = (x, idx, lam) if cacheable else None
        return lam

    def __call__(self, x: torch.Tensor, idx: torch.Tensor | None = None, *, num_data: int | None = None):
        explicit_guide(x, idx, spec=self.spec, lam=self.lambda_for(x, idx), num_data=num_data)


class LocalStep:
    r"""The ``svi-local`` step: the engine's joint step, the stored :math:`\lambda_i` at their own step size
    ``local_lr`` (each row is updated once per epoch, when its datapoint is in the batch, so the networks'
    learning rate barely moves it)."""

    def __init__(self, local_lr: float):
        if not (isinstance(local_lr, (int, float)) and not isinstance(local_lr, bool) and math.isfinite(local_lr)
                and local_lr > 0):
            raise ValueError(f"svi-local local_lr: expected a positive number, received {local_lr!r}")
        self.local_lr = float(local_lr)

    def __call__(self, trainer, args, idx) -> float:
        sparse = trainer._optim.optimizers.get("sparse")  # the per-datapoint tables (ppl_models.guides.mean_field)
        if sparse is not None:
            for group in sparse.param_groups:
                group["lr"] = self.local_lr
        return trainer._train_step(args, idx)


class StopGradientStep:
    r"""The ``semi-amortized`` step with ``refine_grad="stop"`` (Kim et al. 2018, Algorithm 1 without the
    second-order terms): :math:`\theta` gets the gradient of the ELBO at :math:`\lambda_K`, :math:`\phi` that of
    the ELBO at :math:`\lambda_0 = \mathrm{enc}_\phi(x)`."""

    def __init__(self, guide: RefiningGuide):
        self.guide = guide

    def __call__(self, trainer, args, idx) -> float:
        model, spec, elbo, kwargs = trainer.model, self.guide.spec, trainer.objective, trainer.loss_kwargs()
        encoder = self.guide.encoder
        pyro.module("encoder", encoder)
        lam0 = encoder(args[0])
        with poutine.block():
            lam_k = self.guide.refine(lam0, args, idx)
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


class RefinedJointStep:
    r"""The step of ``svi-inner`` and end-to-end ``semi-amortized``: the guide (a :class:`RefiningGuide`) fits
    :math:`\lambda` for the batch inside the ELBO's trace, then the engine's joint optimizer step.  An explicit step
    rule although it ends in the joint step: its inner loop is no single ELBO evaluation, so the engine neither
    captures it (the fast path: one notice, ``fast_path_off``) nor splits it over processes (one error)."""

    def __init__(self, guide: "RefiningGuide"):
        self.fast_path_off = (f"the guide optimizes λ for each batch inside the step ({guide.num_steps} inner "
                              f"{guide.loop.optimizer} steps)")

    def __call__(self, trainer, args, idx) -> float:
        return trainer._train_step(args, idx)


def step_rule(guide: Callable, step: Optional[Callable]) -> Optional[Callable]:
    r"""The engine's ``step_fn`` for a strategy's ``(guide, step)`` (:func:`make_strategy`): ``step``, or a
    :class:`RefinedJointStep` when the guide refines :math:`\lambda` inside each step; ``None``: the joint step."""
    if step is None and isinstance(guide, RefiningGuide):
        return RefinedJointStep(guide)
    return step


def make_strategy(name: str, model: Callable, instance_guide: Callable, spec: ModelSpec,
                  modules: Dict[str, torch.nn.Module], *, num_steps: int | None = None, lr: float | None = None,
                  refine_grad: str = "stop", optimizer: str | None = None, lr_decay: float | None = None,
                  local_lr: float | None = None):
    r"""``(guide, step)`` for the strategy ``name``: the guide the engine trains and evaluates, and the step
    rule (``None``: the engine's joint step on every parameter).

    The inner loop of ``svi-inner`` and ``semi-amortized`` is :func:`inner_loop` of that strategy with the
    fields given here (``None``: the measured default of the module docstring); end-to-end refinement
    differentiates through the steps, so it takes plain steps (``optimizer="sgd"``).  ``svi-local`` with a
    ``local_lr`` updates its stored :math:`\lambda_i` at that step size (:class:`LocalStep`; ``None``:
    :data:`LOCAL_LR`)."""
    guide_for_strategy(name)  # validates the name
    if refine_grad not in REFINE_GRADS:
        raise UnknownNameError("refine_grad", refine_grad, REFINE_GRADS)
    if optimizer is not None and optimizer not in INNER_OPTIMIZERS:
        raise UnknownNameError("inner optimizer", optimizer, INNER_OPTIMIZERS)
    if name == "svi-local":
        return instance_guide, LocalStep(LOCAL_LR if local_lr is None else local_lr)
    if name == "amortized":
        return instance_guide, None
    end_to_end = name == "semi-amortized" and refine_grad == "end-to-end"
    if end_to_end and optimizer == "adam":
        raise ValueError("inner optimizer 'adam' is not differentiable; end-to-end refinement needs 'sgd'")
    loop = inner_loop(name, num_steps=num_steps, lr=lr, optimizer="sgd" if end_to_end else optimizer,
                      lr_decay=lr_decay)
    if name == "svi-inner":
        return RefiningGuide(model, spec, loop=loop), None
    if "encoder" not in modules:
        raise ValueError(
            f"strategy 'semi-amortized' needs an amortized guide with an 'encoder'; the guide has {sorted(modules)}"
        )
    guide = RefiningGuide(model, spec, loop=loop, encoder=modules["encoder"], create_graph=end_to_end)
    return guide, (None if end_to_end else StopGradientStep(guide))


def inference_guide(name: str, model: Callable, spec: ModelSpec, trained_guide: Callable, *,
                    loop: InnerLoop | None = None) -> Callable:
    r"""The guide that infers :math:`\lambda` for data the training never saw, after training with strategy ``name``.

    ``amortized`` and ``semi-amortized``: the trained guide (the encoder, with its refinement).  ``svi-local``
    (whose :math:`\lambda_i` exist for training points only) and ``svi-inner``: :math:`\lambda` fitted per
    batch from the prior with ``loop`` (default :func:`inner_loop` ``("test")``: 300 Adam steps).
    """
    guide_for_strategy(name)  # validates the name
    if name in ("amortized", "semi-amortized"):
        return trained_guide
    return RefiningGuide(model, spec, loop=loop or inner_loop("test"))
