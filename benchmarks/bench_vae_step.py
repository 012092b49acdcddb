"""Steps per second of one VAE training step: the engine against hand-written PyTorch and plain Pyro.

The network is the package's MNIST VAE, 784-400-20 (encoder 784->400 ReLU -> z_loc, softplus z_scale;
decoder 20->400 ReLU -> 784 Bernoulli logits), batch 128, learning rate 1e-3.  Every implementation
starts from the same weights and consumes the same sequence of dynamically binarized batches (real
MNIST from ``$PPL_MODELS_DATA``, default ``<repo>/../shared/data``; or simulated pixels with
``--simulated``).  Each step returns the loss as a Python float (one ``.item()``), as a training loop
that logs its loss does.

Implementations (all losses are the N/batch-scaled batch sum, i.e. the -ELBO estimate of the whole
data set, as the engine's plate does):

a. ``hand``        hand-written eager PyTorch: analytic Gaussian KL + BCE-with-logits sum,
                   reparameterized sample, ``torch.optim.Adam(lr=1e-3)`` default (single-tensor on CPU);
b. ``hand_fused``  the same with ``Adam(fused=True)``;
c. ``pyro_svi``    ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO()).step``;
d. ``pyro_dl``     ``Trace_ELBO().differentiable_loss`` + ``torch.optim.Adam`` (default);
e. ``engine_trace`` / ``engine_meanfield``  ``Trainer.train_step`` with ``Trace_ELBO`` /
                   ``TraceMeanField_ELBO`` (analytic KL, like ``hand``);
f. ``engine_fit``  ``Trainer.fit`` (Trace_ELBO) for the same number of steps: the whole loop,
                   including its own dynamic binarization of each batch (informational).

c-f run with Pyro validation off (the engine turns it off after its first step).

Timing: one process, warm-up first, then ``--rounds`` rounds; in each round every implementation runs
``--steps`` steps, in an order rotated from round to round.  Reported: the median steps/s over rounds
and the median over rounds of the per-round ratio to ``hand`` (and to ``hand_fused``); the per-round
ratio pairs measurements taken seconds apart, so it is robust to other load on the machine.

The last line printed is one JSON object with every figure.

    python benchmarks/bench_vae_step.py                 # 12 rounds x 100 steps, real MNIST
    python benchmarks/bench_vae_step.py --quick --simulated
"""

from __future__ import annotations

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch import nn
from torch.nn import functional as F

import ppl_models as pm
from harness import HIDDEN, X_DIM, Z_DIM, Impl, fresh_instance, measure, parser, prepare, pyro_scope, report
from ppl_models.data import DynamicBinarized
from ppl_models.infer import Trainer

GOAL = 0.95


# ------------------------------------------------------------------------------ hand-written VAE
class HandVAE(nn.Module):
    """The package's VAE written out in plain PyTorch (weights copied from the package's networks)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(X_DIM, HIDDEN)
        self.enc_loc = nn.Linear(HIDDEN, Z_DIM)
        self.enc_scale = nn.Linear(HIDDEN, Z_DIM)
        self.dec1 = nn.Linear(Z_DIM, HIDDEN)
        self.dec2 = nn.Linear(HIDDEN, X_DIM)

    def copy_from(self, modules: nn.ModuleDict) -> "HandVAE":
        enc, dec = modules["encoder"], modules["decoder"]
        pairs = [
            (self.enc, enc.body[0][0]),
            (self.enc_loc, enc.z_loc),
            (self.enc_scale, enc.z_scale),
            (self.dec1, dec.net[0]),
            (self.dec2, dec.net[2]),
        ]
        with torch.no_grad():
            for mine, theirs in pairs:
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
        return self

    def loss(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale`` x (BCE-with-logits sum + analytic KL(q || N(0, I)) sum): the -ELBO estimate."""
        h = F.relu(self.enc(x))
        z_loc = self.enc_loc(h)
        z_scale = F.softplus(self.enc_scale(h))
        z = z_loc + z_scale * torch.randn_like(z_loc)
        logits = self.dec2(F.relu(self.dec1(z)))
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = 0.5 * (z_loc.pow(2) + z_scale.pow(2) - 1.0).sum() - z_scale.log().sum()
        return (rec + kl) * scale


# ------------------------------------------------------------------------------ implementations
def build_impls(base: pm.Instance, data: DynamicBinarized, num_data: int, batch_size: int, lr: float):
    scale = num_data / batch_size
    impls = []

    for name, label, fused in (
        ("hand", "a. hand-written, Adam", False),
        ("hand_fused", "b. hand-written, Adam fused", True),
    ):
        impls.append(Impl(name, label, hand_step(base, lr, fused, scale)))

    # c. Pyro SVI
    inst = fresh_instance(base, "amortized", num_data)
    svi = SVI(inst.model, inst.guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    impls.append(
        Impl(
            "pyro_svi",
            "c. pyro SVI + pyro.optim.Adam",
            lambda batch, svi=svi: svi.step(*batch[0], batch[1], num_data=num_data),
            pyro_scope(validation=False),
        )
    )

    # d. differentiable_loss + torch Adam
    inst = fresh_instance(base, "amortized", num_data)
    elbo = Trace_ELBO()
    opt = torch.optim.Adam(inst.modules.parameters(), lr=lr)

    def dl_step(batch, inst=inst, elbo=elbo, opt=opt):
        (x,), idx = batch
        opt.zero_grad()
        loss = elbo.differentiable_loss(inst.model, inst.guide, x, idx, num_data=num_data)
        loss.backward()
        opt.step()
        return loss.item()

    impls.append(Impl("pyro_dl", "d. Trace_ELBO.differentiable_loss + Adam", dl_step, pyro_scope(validation=False)))

    # e. the engine's step
    for name, label, elbo_name in (
        ("engine_trace", "e. engine Trainer.train_step, Trace_ELBO", "Trace_ELBO"),
        ("engine_meanfield", "e. engine Trainer.train_step, TraceMeanField_ELBO", "TraceMeanField_ELBO"),
    ):
        inst = fresh_instance(base, "amortized", num_data)
        trainer = Trainer(inst.model, inst.guide, data, elbo=elbo_name, lr=lr, batch_size=batch_size, progress=False,
                          fast_path=False)  # Pyro every step (bench_fast_path.py measures the fast path)
        impls.append(
            Impl(name, label, lambda batch, t=trainer: t.train_step(batch[0], batch[1]), pyro_scope())
        )

    # f. the engine's whole loop (its own batches: shuffling and dynamic binarization included)
    inst = fresh_instance(base, "amortized", num_data)
    trainer = Trainer(inst.model, inst.guide, data, lr=lr, batch_size=batch_size, progress=False, num_epochs=10**9,
                      fast_path=False)
    impls.append(Impl("engine_fit", "f. engine Trainer.fit (own data, informational)", trainer, pyro_scope(), True))
    return impls


def hand_step(base, lr: float, fused: bool, scale: float):
    """One hand-written training step on the weights of ``base`` (Adam, default or fused): ``step(batch) -> loss``."""
    net = HandVAE().copy_from(base.modules)
    opt = torch.optim.Adam(net.parameters(), lr=lr, fused=fused)

    def step(batch):
        (x,), _ = batch
        opt.zero_grad()
        loss = net.loss(x, scale)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def loss_check(base: pm.Instance, batch, num_data: int, batch_size: int) -> dict:
    """Same weights and noise: the hand-written loss against Pyro's TraceMeanField_ELBO on the package's model."""
    (x,), idx = batch
    net = HandVAE().copy_from(base.modules)
    inst = fresh_instance(base, "amortized", num_data)
    with torch.no_grad(), torch.random.fork_rng(devices=[]), pyro.get_param_store().scope():
        torch.manual_seed(1234)
        hand = net.loss(x, num_data / batch_size).item()
        torch.manual_seed(1234)
        pyro_loss = TraceMeanField_ELBO().differentiable_loss(inst.model, inst.guide, x, idx, num_data=num_data).item()
    return {"hand": hand, "pyro_TraceMeanField_ELBO": pyro_loss, "rel_diff": abs(hand - pyro_loss) / abs(pyro_loss)}


def main(argv=None) -> dict:
    args = parser(__doc__.split("\n")[0], None, "rows of the data set (all / 10000 simulated)").parse_args(argv)
    warmup, data, source, batches = prepare(args)
    num_data = data.num_data

    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    base = pm.instantiate("vae", "amortized", num_data=num_data)
    check = loss_check(base, batches[0], num_data, args.batch_size)
    impls = build_impls(base, data, num_data, args.batch_size, args.lr)
    pyro.set_rng_seed(args.seed)
    rates = measure(impls, batches, args.rounds, args.steps, warmup)
    title = f"VAE {X_DIM}-{HIDDEN}-{Z_DIM} training step, batch {args.batch_size}, data {source} (N={num_data})"
    return report("vae_step", title, args, warmup, impls, rates, ("hand", "hand_fused"), check, GOAL,
                  {"num_data": num_data})


if __name__ == "__main__":
    main()
