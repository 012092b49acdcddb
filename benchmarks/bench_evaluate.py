"""Importance-sampled evaluation (IWAE-K log-likelihood) of the package's evaluator against hand-written PyTorch.

The problem is the package's MNIST VAE, 784-400-20, with the same weights for every implementation, on the
first ``--num-data`` binarized MNIST test images (fixed binarization; the issue's size is ``--num-data 10000
--num-samples 5000``), ``--batch-size`` images at a time, ``--chunk-size`` samples per vectorized call (default:
the package's :func:`~ppl_models.infer.evaluate.default_chunk_size`).

Implementations:

a. ``hand``           hand-written eager PyTorch: the encoder once per batch, then per chunk of samples
                      ``z = z_loc + z_scale * eps``, the decoder, ``-BCE-with-logits`` summed over pixels,
                      ``log p(z) - log q(z | x)``, and ``logsumexp`` over the K samples;
b. ``hand_compiled``  the same chunk function under ``torch.compile`` (inductor fuses the elementwise work after
                      the decoder's last product): the most a compiled evaluation could gain;
c. ``evaluate``       the package's :func:`ppl_models.infer.evaluate.evaluate`: Pyro traces of guide and model per
                      chunk, the ELBO / KL / reconstruction summaries and the PSIS k̂ diagnostic per datapoint
                      (its share of the time is reported separately as ``psis_s``);
d. ``evaluate_compiled`` the same with ``fast_path="compile"``: each chunk's Pyro computation captured once
                      and compiled (:class:`ppl_models.infer.fastpath.CapturedTerms`); the same draws as c.

Check: ``hand`` and ``hand_compiled`` draw the same noise, and so do ``evaluate`` and ``evaluate_compiled``, so
within each pair the per-image log-likelihoods agree to float rounding (the largest absolute difference to the
pair's first is printed); between the pairs the noise differs (the evaluator first runs the model once to learn
the sites' layout), so their agreement is statistical: the mean difference to ``hand`` and its standard error.

Timing: one process, ``--rounds`` rounds, each implementation once per round over the whole set, the order
rotated per round; reported: median images/s and the median per-round ratio to ``hand``.  The last line is
one JSON object with every figure.

    python benchmarks/bench_evaluate.py --threads 1 --num-data 1000 --num-samples 1000
    python benchmarks/bench_evaluate.py --num-data 10000 --num-samples 5000 --rounds 1   # the issue's size
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import pyro
import torch
import torch.nn.functional as F

import ppl_models as pm
from harness import REPO, emit, versions
from ppl_models.data import load_binarized_mnist
from ppl_models.infer.evaluate import default_chunk_size, evaluate

LOG_2PI = math.log(2 * math.pi)


def hand_iwae(instance, x: torch.Tensor, num_samples: int, batch_size: int, chunk_size: int, seed: int,
              chunk_fn=None) -> torch.Tensor:
    """Per-image IWAE-K log-likelihood ``(N,)`` by hand, drawing the noise as the package's evaluator does."""
    encoder, decoder = instance.modules["encoder"], instance.modules["decoder"]
    chunk_fn = chunk_fn or log_weights_chunk
    out = torch.empty(x.shape[0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            z_loc, z_scale = encoder(xb)
            parts = []
            for s in range(0, num_samples, chunk_size):
                size = min(chunk_size, num_samples - s)
                eps = torch.randn(size, *z_loc.shape)
                parts.append(chunk_fn(decoder.net, xb, z_loc, z_scale, eps))
            lw = torch.cat(parts)  # (K, batch)
            out[start : start + xb.shape[0]] = (torch.logsumexp(lw, 0) - math.log(num_samples)).double()
    return out


def log_weights_chunk(net, x, z_loc, z_scale, eps):
    """``log p(x, z) - log q(z | x)`` for ``z = z_loc + z_scale * eps``: ``(chunk, batch)``."""
    z = z_loc + z_scale * eps
    logits = net(z)
    log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    log_prior = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
    log_q = (-0.5 * (eps.pow(2) + LOG_2PI) - z_scale.log()).sum(-1)
    return log_lik + log_prior - log_q


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-data", type=int, default=1000, help="test images (default %(default)s)")
    p.add_argument("--num-samples", type=int, default=1000, help="K (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=None, help="samples per call (default: the package's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--impls", default="hand,hand_compiled,evaluate,evaluate_compiled")
    p.add_argument("--quick", action="store_true", help="smoke test: 200 images, K = 20, 1 round")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.num_data, args.num_samples, args.rounds = 200, 20, 1
    data_dir = os.environ.get("PPL_MODELS_DATA") or str(REPO.parent / "shared" / "data")
    x = load_binarized_mnist("test", data_dir=data_dir, download=False)[: args.num_data]
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    inst = pm.instantiate("vae", "amortized", num_data=x.shape[0])
    chunk = args.chunk_size or default_chunk_size(inst.spec, args.batch_size)
    names = [n for n in args.impls.split(",") if n]
    compiled = torch.compile(log_weights_chunk, dynamic=False) if "hand_compiled" in names else None

    def run(name):
        start = time.perf_counter()
        if name.startswith("evaluate"):
            res = evaluate(inst.model, inst.guide, x, spec=inst.spec, num_samples=args.num_samples,
                           batch_size=args.batch_size, chunk_size=chunk,
                           generator=torch.Generator().manual_seed(args.seed), progress=False,
                           fast_path="compile" if name == "evaluate_compiled" else False)
            return time.perf_counter() - start, torch.as_tensor(res.log_likelihood), res.timings_s["psis_s"]
        fn = compiled if name == "hand_compiled" else None
        ll = hand_iwae(inst, x, args.num_samples, args.batch_size, chunk, args.seed, fn)
        return time.perf_counter() - start, ll, 0.0

    first = {}
    for name in names:  # warm-up (and compilation) outside the timed rounds
        t0 = time.perf_counter()
        first[name] = run(name)
        first[name] = (time.perf_counter() - t0, first[name][1], first[name][2])
    ref_ll = first[names[0]][1]
    diffs = {n: first[n][1] - ref_ll for n in names}
    pair_first = {n: next(m for m in names if m.split("_")[0] == n.split("_")[0]) for n in names}
    max_diff = {n: float((first[n][1] - first[pair_first[n]][1]).abs().max()) for n in names}
    mean_diff = {n: (float(d.mean()), float(d.std() / math.sqrt(len(d)))) for n, d in diffs.items()}
    seconds = {n: [] for n in names}
    psis = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            s, _, ps = run(name)
            seconds[name].append(s)
            psis[name].append(ps)
    rate = {n: x.shape[0] / statistics.median(v) for n, v in seconds.items()}
    ratio = {n: statistics.median(seconds["hand"][i] / seconds[n][i] for i in range(args.rounds))
             for n in names} if "hand" in names else {}
    print(f"IWAE-{args.num_samples} of the VAE 784-400-20 on {x.shape[0]} binarized MNIST test images, batch "
          f"{args.batch_size}, chunk {chunk}; torch {torch.__version__}, pyro {pyro.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"{'implementation':<16} {'images/s':>10} {'/hand':>7} {'first run s':>12} {'psis s':>8} "
          f"{'max |ll - pair|':>16} {'mean ll - hand (se)':>22}")
    for n in names:
        print(f"{n:<16} {rate[n]:10.1f} {ratio.get(n, float('nan')):7.3f} {first[n][0]:12.2f} "
              f"{statistics.median(psis[n]):8.2f} {max_diff[n]:16.2e} "
              f"{mean_diff[n][0]:12.4f} ({mean_diff[n][1]:.4f})")
    result = {
        "benchmark": "evaluate",
        "images_per_s": rate,
        "ratio_vs_hand": ratio,
        "first_run_s": {n: first[n][0] for n in names},
        "psis_s": {n: statistics.median(psis[n]) for n in names},
        "max_abs_ll_diff_vs_pair": max_diff,
        "mean_ll_diff_vs_first": {n: {"mean": m, "se": se} for n, (m, se) in mean_diff.items()},
        "mean_log_likelihood": float(ref_ll.mean()),
        "num_data": x.shape[0],
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "chunk_size": chunk,
        "rounds": args.rounds,
        **versions(),
    }
    return emit(result)


if __name__ == "__main__":
    main()
