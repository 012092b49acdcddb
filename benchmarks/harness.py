"""What both step benchmarks share: data, batches, interleaved timing, the summary table and its JSON.

Timing: one process; every implementation warms up, then ``rounds`` rounds in which each runs ``steps``
steps, the order rotated from round to round.  Reported: the median steps/s over rounds and the median of
each round's paired ratio to a reference (measurements seconds apart, robust to other load).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pyro
import torch
from torch import nn

import ppl_models as pm
from ppl_models.data import DynamicBinarized, load_mnist
from ppl_models.infer import Trainer

REPO = Path(__file__).resolve().parents[1]
X_DIM, HIDDEN, Z_DIM = 784, 400, 20


def pixel_probs(simulated: bool, num_data: int | None, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Pixel probabilities ``(N, 784)``: MNIST grey levels, or pixels of a random decoder (``--simulated``)."""
    if simulated:
        gen = torch.Generator().manual_seed(seed)
        decoder = nn.Sequential(nn.Linear(Z_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, X_DIM))
        with torch.no_grad():
            for p in decoder.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            probs = torch.sigmoid(decoder(torch.randn(num_data or 10000, Z_DIM, generator=gen)) - 2.0)
        return probs, "simulated"
    data_dir = os.environ.get("PPL_MODELS_DATA") or str(REPO.parent / "shared" / "data")
    x, _ = load_mnist("train", data_dir=data_dir, download=False)
    return (x[:num_data] if num_data else x), f"mnist-train (dynamic binarization) from {data_dir}"


def make_batches(data: DynamicBinarized, batch_size: int, count: int, seed: int = 1):
    """``count`` batches ``((x,), idx)`` drawn as the engine draws them (shuffled rows, fresh binarization)."""
    gen = torch.Generator().manual_seed(seed)
    batches, perm, pos = [], torch.randperm(data.num_data, generator=gen), 0
    for _ in range(count):
        if pos + batch_size > data.num_data:
            perm, pos = torch.randperm(data.num_data, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        batches.append((data.batch(idx, gen), idx))
    return batches


class Impl:
    """One implementation: ``step(batch) -> float`` (or a :class:`Trainer` whose ``fit`` loop is timed)
    and the context its steps run in."""

    def __init__(self, name: str, label: str, step, context=nullcontext, informational: bool = False):
        self.name, self.label, self.step, self.context, self.informational = name, label, step, context, informational


def pyro_scope(validation: bool | None = None):
    """A private Pyro param store for one implementation (parameter names are shared), with Pyro
    validation set to ``validation`` (``None``: left as it is)."""
    state = {"params": {}, "constraints": {}}

    @contextmanager
    def context():
        with pyro.get_param_store().scope(state):
            if validation is None:
                yield
            else:
                with pyro.validation_enabled(validation):
                    yield

    return context


def fresh_instance(base, guide: str, num_data: int):
    """A new instance of the VAE with ``guide``, starting from ``base``'s weights."""
    inst = pm.instantiate("vae", guide, num_data=num_data)
    inst.modules.load_state_dict(base.modules.state_dict())
    return inst


def run_steps(impl: Impl, batches, steps: int) -> float:
    """Seconds for ``steps`` steps of ``impl``."""
    with impl.context():
        if isinstance(impl.step, Trainer):  # the whole fit loop
            trainer = impl.step
            trainer.max_steps = trainer.step + steps
            start = time.perf_counter()
            trainer.fit()
            return time.perf_counter() - start
        start = time.perf_counter()
        for i in range(steps):
            loss = impl.step(batches[i % len(batches)])
        elapsed = time.perf_counter() - start
    if not math.isfinite(loss):
        raise FloatingPointError(f"{impl.name}: non-finite loss {loss}")
    return elapsed


def measure(impls, batches, rounds: int, steps: int, warmup: int) -> dict:
    for impl in impls:
        run_steps(impl, batches, warmup)
    rates = {impl.name: [] for impl in impls}
    for r in range(rounds):
        k = r % len(impls)
        for impl in impls[k:] + impls[:k]:
            rates[impl.name].append(steps / run_steps(impl, batches, steps))
    return rates


def summarize(impls, rates, refs) -> dict:
    out = {"steps_per_s": {}, "ratio_vs": {ref: {} for ref in refs}}
    for impl in impls:
        out["steps_per_s"][impl.name] = statistics.median(rates[impl.name])
        for ref in refs:
            paired = [a / b for a, b in zip(rates[impl.name], rates[ref])]
            out["ratio_vs"][ref][impl.name] = statistics.median(paired)
    return out


def print_table(impls, rates, summary, refs) -> None:
    head = f"{'implementation':<52} {'steps/s':>9} {'min':>8} {'max':>8}" + "".join(f" {'/' + r:>18}" for r in refs)
    print(head)
    print("-" * len(head))
    for impl in impls:
        r = rates[impl.name]
        line = f"{impl.label:<52} {summary['steps_per_s'][impl.name]:9.1f} {min(r):8.1f} {max(r):8.1f}"
        line += "".join(f" {summary['ratio_vs'][ref][impl.name]:18.3f}" for ref in refs)
        print(line)


def parser(description: str, num_data_default, num_data_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=100, help="steps per implementation per round")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per implementation (steps // 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-data", type=int, default=num_data_default, help=num_data_help)
    p.add_argument("--simulated", action="store_true", help="simulated pixels instead of MNIST")
    p.add_argument("--quick", action="store_true", help="tiny run for a smoke test (2 rounds x 3 steps, N<=1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    return p


def prepare(args):
    """Apply ``--threads``/``--quick``; return ``(warmup, data, source, batches)``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.steps = 2, 3
        args.num_data = min(args.num_data or 1000, 1000)
    warmup = args.warmup if args.warmup is not None else max(2, args.steps // 2)
    probs, source = pixel_probs(args.simulated, args.num_data, args.seed)
    data = DynamicBinarized(probs)
    return warmup, data, source, make_batches(data, args.batch_size, min(args.steps, 100))


def versions() -> dict:
    """torch, pyro and torch's thread count: what every benchmark's JSON line records about the software."""
    return {"torch": torch.__version__, "pyro": pyro.__version__, "threads": torch.get_num_threads()}


def run_info(args, warmup: int) -> dict:
    """:func:`versions` and the timing settings of a step benchmark (rounds, steps, warm-up, batch size)."""
    return {**versions(), "rounds": args.rounds, "steps": args.steps, "warmup": warmup, "batch_size": args.batch_size}


def emit(result: dict) -> dict:
    """Print ``result`` as the one JSON line that ends every benchmark's output; return it."""
    print(json.dumps(result))
    sys.stdout.flush()
    return result


def report(name: str, title: str, args, warmup, impls, rates, refs, check, goal, extra=None) -> dict:
    """Print the header, the table and, as the last line, one JSON object with every figure."""
    summary = summarize(impls, rates, refs)
    print(title)
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds x {args.steps} steps (+{warmup} warm-up), medians over rounds"
    )
    print(f"loss check (same weights, same noise): hand {check['hand']:.4f} vs "
          f"TraceMeanField_ELBO {check['pyro_TraceMeanField_ELBO']:.4f} (rel. diff {check['rel_diff']:.1e})")
    print_table(impls, rates, summary, refs)
    engine = {k: summary["ratio_vs"][refs[0]][k] for k in ("engine_trace", "engine_meanfield")}
    result = {
        "benchmark": name,
        "steps_per_s": summary["steps_per_s"],
        **{f"ratio_vs_{ref}": summary["ratio_vs"][ref] for ref in refs},
        f"engine_vs_{refs[0]}": engine,
        "goal": goal,
        "goal_met": {k: v >= goal for k, v in engine.items()},
        "informational": [impl.name for impl in impls if impl.informational],
        "loss_check": check,
        **run_info(args, warmup),
        "data": "simulated" if args.simulated else "mnist",
        "loss_scale": "N/batch x batch sum (the -ELBO estimate of the whole data set)",
        **(extra or {}),
    }
    return emit(result)
