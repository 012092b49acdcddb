"""Steps per second of one SVI step with a per-datapoint (mean-field) guide: sparse rows vs hand-written.

Model: the package's MNIST VAE decoder 20-400-784.  Guide: a :math:`\\lambda_i = (z\\_loc_i,
softplus^{-1}(z\\_scale_i))` per training datapoint, ``N`` = 60000 rows of ``2 * z_dim`` numbers
(the package's ``mean-field`` guide: one ``nn.Embedding(N, 40, sparse=True)`` table).  Batch 128,
learning rate 1e-3.  Every implementation starts from the same weights and table and consumes the
same batches (rows ``idx`` and their dynamically binarized pixels; real MNIST from
``$PPL_MODELS_DATA``, default ``<repo>/../shared/data``, or simulated pixels with ``--simulated``).
Each step returns its loss as a Python float.

Implementations (loss = N/batch x (BCE-with-logits sum + Gaussian KL sum), the -ELBO estimate):

a. ``hand_sparse``        hand-written: ``nn.Embedding(N, 2*z_dim, sparse=True)`` + ``SparseAdam`` for the
                          rows, ``torch.optim.Adam`` (default, single-tensor on CPU) for the decoder;
b. ``hand_sparse_fused``  the same with ``Adam(fused=True)`` for the decoder (the engine's choice);
c. ``hand_dense``         a dense ``(N, 2*z_dim)`` parameter + ``Adam`` over everything (every row is
                          read and written every step: why sparse matters);
d. ``hand_dense_fused``   the same with ``Adam(fused=True)``;
e. ``engine_trace`` / ``engine_meanfield``  ``Trainer.train_step`` with the ``mean-field`` guide
                          (sparse table + SparseAdam, fused Adam for the decoder), ``Trace_ELBO`` /
                          ``TraceMeanField_ELBO`` (analytic KL, like the hand-written steps);
f. ``fast_eager`` / ``fast_compile``  the same engine step with ``Trace_ELBO`` on the fast path
                          (``fast_path="eager"`` / ``"compile"``: the λ rows of the batch are an input of the
                          compiled graph, their gradient a sparse tensor for SparseAdam); ``--fast-path``
                          chooses which (default both; the compiled one pays its compile in the warm-up).

Timing as in ``bench_vae_step.py``: one process, warm-up, ``--rounds`` rounds of ``--steps`` steps per
implementation in rotated order; medians over rounds, and per-round paired ratios to ``hand_sparse``.
The last line printed is one JSON object with every figure.

    python benchmarks/bench_local_step.py
    python benchmarks/bench_local_step.py --quick --simulated
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO
from torch import nn
from torch.nn import functional as F

import ppl_models as pm
from harness import HIDDEN, X_DIM, Z_DIM, Impl, fresh_instance, measure, parser, prepare, pyro_scope, report
from ppl_models.data import DynamicBinarized
from ppl_models.infer import Trainer

GOAL = 0.9
TABLE = "local_params"


# ------------------------------------------------------------------------ hand-written step
class HandLocal(nn.Module):
    """Decoder + per-datapoint rows ``[z_loc, softplus^{-1}(z_scale)]``, sparse table or dense parameter."""

    def __init__(self, num_data: int, sparse: bool):
        super().__init__()
        self.sparse = sparse
        self.dec1 = nn.Linear(Z_DIM, HIDDEN)
        self.dec2 = nn.Linear(HIDDEN, X_DIM)
        if sparse:
            self.table = nn.Embedding(num_data, 2 * Z_DIM, sparse=True)
        else:
            self.table = nn.Parameter(torch.zeros(num_data, 2 * Z_DIM))

    @property
    def table_weight(self) -> torch.Tensor:
        return self.table.weight if self.sparse else self.table

    def copy_from(self, modules: nn.ModuleDict) -> "HandLocal":
        dec = modules["decoder"]
        with torch.no_grad():
            for mine, theirs in ((self.dec1, dec.net[0]), (self.dec2, dec.net[2])):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
            self.table_weight.copy_(modules[TABLE].tables["z"].weight)
        return self

    def loss(self, x: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
        rows = self.table(idx) if self.sparse else self.table[idx]
        z_loc, raw = rows.split(Z_DIM, dim=-1)
        z_scale = F.softplus(raw)
        z = z_loc + z_scale * torch.randn_like(z_loc)
        logits = self.dec2(F.relu(self.dec1(z)))
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = 0.5 * (z_loc.pow(2) + z_scale.pow(2) - 1.0).sum() - z_scale.log().sum()
        return (rec + kl) * scale

    def optimizers(self, lr: float, fused: bool):
        decoder = [*self.dec1.parameters(), *self.dec2.parameters()]
        if self.sparse:
            return [torch.optim.SparseAdam([self.table.weight], lr=lr), torch.optim.Adam(decoder, lr=lr, fused=fused)]
        return [torch.optim.Adam([self.table, *decoder], lr=lr, fused=fused)]


def build_impls(base: pm.Instance, data: DynamicBinarized, num_data: int, batch_size: int, lr: float,
                fast_paths=("eager", "compile")):
    scale = num_data / batch_size
    impls = []
    for name, label, sparse, fused in (
        ("hand_sparse", "a. hand-written sparse rows + SparseAdam, Adam", True, False),
        ("hand_sparse_fused", "b. hand-written sparse rows + SparseAdam, Adam fused", True, True),
        ("hand_dense", "c. hand-written dense (N, 40) param + Adam", False, False),
        ("hand_dense_fused", "d. hand-written dense (N, 40) param + Adam fused", False, True),
    ):
        net = HandLocal(num_data, sparse).copy_from(base.modules)
        opts = net.optimizers(lr, fused)

        def step(batch, net=net, opts=opts):
            (x,), idx = batch
            for opt in opts:
                opt.zero_grad()
            loss = net.loss(x, idx, scale)
            loss.backward()
            for opt in opts:
                opt.step()
            return loss.item()

        impls.append(Impl(name, label, step))

    for name, label, elbo_name in (
        ("engine_trace", "e. engine Trainer.train_step, Trace_ELBO", "Trace_ELBO"),
        ("engine_meanfield", "e. engine Trainer.train_step, TraceMeanField_ELBO", "TraceMeanField_ELBO"),
    ):
        inst = fresh_instance(base, "mean-field", num_data)
        trainer = Trainer(inst.model, inst.guide, data, elbo=elbo_name, lr=lr, batch_size=batch_size, progress=False,
                          fast_path=False)  # Pyro every step; the fast path's rows follow
        impls.append(Impl(name, label, lambda batch, t=trainer: t.train_step(batch[0], batch[1]), pyro_scope()))
    for mode in fast_paths:
        inst = fresh_instance(base, "mean-field", num_data)
        trainer = Trainer(inst.model, inst.guide, data, elbo="Trace_ELBO", lr=lr, batch_size=batch_size,
                          progress=False, fast_path=mode)
        label = f"f. engine fast path, {'eager' if mode == 'eager' else 'compiled'}, Trace_ELBO"
        impls.append(Impl(f"fast_{mode}", label, lambda batch, t=trainer: t.train_step(batch[0], batch[1]),
                          pyro_scope()))
    return impls


def loss_check(base: pm.Instance, batch, num_data: int, batch_size: int) -> dict:
    """Same weights and noise: the hand-written loss against TraceMeanField_ELBO on the package's model and guide."""
    (x,), idx = batch
    net = HandLocal(num_data, True).copy_from(base.modules)
    inst = fresh_instance(base, "mean-field", num_data)
    with torch.no_grad(), torch.random.fork_rng(devices=[]), pyro.get_param_store().scope():
        torch.manual_seed(1234)
        hand = net.loss(x, idx, num_data / batch_size).item()
        torch.manual_seed(1234)
        pyro_loss = TraceMeanField_ELBO().differentiable_loss(inst.model, inst.guide, x, idx, num_data=num_data).item()
    return {"hand": hand, "pyro_TraceMeanField_ELBO": pyro_loss, "rel_diff": abs(hand - pyro_loss) / abs(pyro_loss)}


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0], 60000, "N, rows of the per-datapoint table")
    p.add_argument("--fast-path", default="eager,compile",
                   help="engine fast-path rows: a comma-separated subset of eager, compile (empty: none)")
    args = p.parse_args(argv)
    fast_paths = [m for m in args.fast_path.split(",") if m]
    if set(fast_paths) - {"eager", "compile"}:
        raise SystemExit(f"--fast-path: expected a subset of eager, compile; received {args.fast_path!r}")
    warmup, data, source, batches = prepare(args)
    num_data = data.num_data

    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    base = pm.instantiate("vae", "mean-field", num_data=num_data)
    with torch.no_grad():  # a table that is not all alike, so a row mix-up would show in the loss check
        base.modules[TABLE].tables["z"].weight[:, :Z_DIM].normal_(0.0, 0.5)
    check = loss_check(base, batches[0], num_data, args.batch_size)
    impls = build_impls(base, data, num_data, args.batch_size, args.lr, fast_paths)
    pyro.set_rng_seed(args.seed)
    rates = measure(impls, batches, args.rounds, args.steps, warmup)
    title = (f"per-datapoint guide step: decoder {Z_DIM}-{HIDDEN}-{X_DIM}, table ({num_data}, {2 * Z_DIM}), "
             f"batch {args.batch_size}, data {source}")
    return report("local_step", title, args, warmup, impls, rates, ("hand_sparse", "hand_sparse_fused"), check, GOAL,
                  {"num_data": num_data})


if __name__ == "__main__":
    main()
