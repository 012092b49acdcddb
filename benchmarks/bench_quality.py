"""The main job against fifty lines of plain PyTorch: test NLL at one wall-clock training budget.

In one invocation, two children run one after the other on the same machine, with the same threads:

* ``engine``: the README's main job, ``ppl-models fit examples/configs/vae_mnist.toml``, run as the command
  itself with ``-o train.time_limit=BUDGET`` (its clock starts at the first step) and no evaluation;
* ``hand``: a hand-written eager PyTorch VAE of the same sizes (784-200-200-50, ReLU, softplus scale), the
  same initial weights (the run's seed through the package's ``build``), the same training images (the first
  50,000, dynamically binarized), the same objective (analytic-KL ELBO, N/B-scaled), Adam 1e-3 with no
  schedule, batch 128, trained until the same budget has passed.

Both trained networks are then scored by one IWAE-K evaluator written here in plain torch, on the same
fixed binarization of the first ``--num-test`` test images, so the comparison does not depend on the
package's evaluator.  Printed: each NLL with its standard error over images, the paired difference with
its standard error, steps/s of each, and one JSON line.

``--load N`` starts N busy processes (one spinning Python loop each) for the whole run, and adds a third
child: the main job with one thread under the same load, the reference for "degrades like a one-thread run".

    python benchmarks/bench_quality.py                 # 15-minute budget, IWAE-5000 on all 10k test images
    python benchmarks/bench_quality.py --quick         # CI smoke test: 20 s budget, IWAE-100 on 500 images
    python benchmarks/bench_quality.py --quick --load 3
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "vae_mnist.toml"
Z_DIM, HIDDEN, X_DIM = 50, (200, 200), 784
BATCH, LR, SEED, VALID = 128, 1e-3, 0, 10000


def data_dir() -> str:
    return os.environ.get("PPL_MODELS_DATA") or str(REPO.parent / "shared" / "data")


# ----------------------------------------------------------------------------- the hand-written VAE
def hand_networks():
    """Encoder ``x -> (z_loc, z_scale)`` and decoder ``z -> logits`` as plain ``nn`` layers."""
    import torch
    from torch import nn

    def mlp(sizes):
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(a, b))
        return nn.Sequential(*layers)

    class Encoder(nn.Module):  # parameter names as the package's, so weights copy by name
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(mlp([X_DIM, *HIDDEN]), nn.ReLU())
            self.z_loc, self.z_scale = nn.Linear(HIDDEN[-1], Z_DIM), nn.Linear(HIDDEN[-1], Z_DIM)

        def forward(self, x):
            h = self.body(x)
            return self.z_loc(h), torch.nn.functional.softplus(self.z_scale(h))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp([Z_DIM, *HIDDEN, X_DIM])

        def forward(self, z):
            return self.net(z)

    return Encoder(), Decoder()


def initial_weights(encoder, decoder) -> None:
    """Copy the main job's initial networks (built by the package from the run's seed) into ours."""
    import pyro

    from ppl_models import instantiate

    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    inst = instantiate("vae", "amortized", num_data=60000 - VALID,
                       model_kwargs={"z_dim": Z_DIM, "hidden_dims": list(HIDDEN)},
                       guide_kwargs={"hidden_dims": list(HIDDEN), "scale": "softplus"})
    encoder.load_state_dict(inst.modules["encoder"].state_dict())  # strict: the same names and shapes
    decoder.load_state_dict(inst.modules["decoder"].state_dict())


def hand_loss(encoder, decoder, x, scale: float = 1.0):
    """The hand-written step's objective: -ELBO of the batch ``x`` (analytic KL), times ``scale`` (N/B)."""
    import torch
    import torch.nn.functional as F

    z_loc, z_scale = encoder(x)
    z = z_loc + z_scale * torch.randn_like(z_loc)
    log_px = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="sum")
    kl = 0.5 * (z_loc.pow(2) + z_scale.pow(2) - 1).sum() - z_scale.log().sum()
    return -(log_px - kl) * scale


def train_hand(budget: float | None, max_steps: int | None, out: Path) -> None:
    """Train until ``budget`` seconds have passed (from the first step) or after ``max_steps`` steps."""
    import torch

    from ppl_models.data.mnist import train_valid_test_images

    t0 = time.perf_counter()
    x_train = train_valid_test_images(VALID, data_dir(), download=False)[0]
    encoder, decoder = hand_networks()
    initial_weights(encoder, decoder)
    params = [*encoder.parameters(), *decoder.parameters()]
    optim = torch.optim.Adam(params, lr=LR)
    n = x_train.shape[0]
    gen = torch.Generator().manual_seed(SEED)
    setup = time.perf_counter() - t0
    steps, start = 0, time.perf_counter()
    deadline = None if budget is None else start + budget

    def done() -> bool:
        return (max_steps is not None and steps >= max_steps) or (deadline is not None and time.perf_counter() >= deadline)

    while not done():
        perm = torch.randperm(n, generator=gen)
        for b in range(n // BATCH):
            x = torch.bernoulli(x_train[perm[b * BATCH:(b + 1) * BATCH]], generator=gen)
            loss = hand_loss(encoder, decoder, x, n / BATCH)
            optim.zero_grad()
            loss.backward()
            optim.step()
            steps += 1
            if done():
                break
    train_seconds = time.perf_counter() - start
    torch.save({"encoder": encoder.state_dict(), "decoder": decoder.state_dict(), "steps": steps,
                "train_seconds": train_seconds, "setup_seconds": setup}, out)


# ----------------------------------------------------------------------------- the engine (the README command)
def train_engine(budget: float | None, max_steps: int | None, out: Path, threads: int | None) -> None:
    """The main job as the README runs it, with a training budget (seconds, or steps) and no evaluation; its
    networks to ``out``."""
    import torch

    from ppl_models.infer.checkpoint import list_checkpoints, load_checkpoint

    run_dir = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    cmd = [sys.executable, "-m", "ppl_models", "fit", str(CONFIG), "--run-dir", str(run_dir / "run"),
           "--no-evaluate", "--no-progress", "-o", "train.num_epochs=100000",
           "-o", f"train.time_limit={budget}" if budget is not None else f"train.max_steps={max_steps}",
           "-o", "output.plots=false"]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the main job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    state = load_checkpoint(list_checkpoints(run_dir / "run" / "checkpoints")[-1])
    params = state["params"]
    encoder, decoder = hand_networks()
    for name, net in (("encoder", encoder), ("decoder", decoder)):  # strict: the same names and shapes
        net.load_state_dict({k.split("$$$", 1)[1]: v for k, v in params.items() if k.startswith(name + "$$$")})
    metrics = json.loads((run_dir / "run" / "train.json").read_text())
    torch.save({"encoder": encoder.state_dict(), "decoder": decoder.state_dict(), "steps": state["step"],
                "wall_seconds": wall, "train_seconds": metrics["train_seconds"],
                "setup_seconds": metrics.get("setup_seconds"), "stderr_tail": proc.stderr[-600:]}, out)


# ----------------------------------------------------------------------------- one evaluator for both
def iwae_nll(saved: dict, x_test, num_samples: int, chunk: int = 500):
    """Per-image -log p(x) estimates by IWAE-K, ``(num_test,)`` in nats."""
    import torch
    import torch.nn.functional as F

    encoder, decoder = hand_networks()
    encoder.load_state_dict(saved["encoder"])
    decoder.load_state_dict(saved["decoder"])
    out = []
    with torch.no_grad():
        for x in x_test.split(10):
            z_loc, z_scale = encoder(x)
            log_w = []
            for k0 in range(0, num_samples, chunk):
                k = min(chunk, num_samples - k0)
                eps = torch.randn(k, *z_loc.shape)
                z = z_loc + z_scale * eps
                log_px = -F.binary_cross_entropy_with_logits(decoder(z), x.expand(k, *x.shape), reduction="none").sum(-1)
                log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
                log_qz = (-0.5 * (eps.pow(2) + math.log(2 * math.pi)) - z_scale.log()).sum(-1)
                log_w.append(log_px + log_pz - log_qz)
            log_w = torch.cat(log_w)
            out.append(-(torch.logsumexp(log_w, 0) - math.log(num_samples)))
    return torch.cat(out)


# ----------------------------------------------------------------------------- load and children
def _spin(stop):
    while not stop.is_set():
        pass


def start_load(n: int):
    stop = mp.Event()
    procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    return stop, procs


def child(args) -> None:
    out = Path(args.child_out)
    if args.child == "hand":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        train_hand(args.budget, args.max_steps, out)
    else:
        train_engine(args.budget, args.max_steps, out, args.threads)


def describe(args) -> str:
    return f"{args.max_steps} steps" if args.max_steps is not None else f"{args.budget:g} s"


def run_child(kind: str, args, threads: int | None) -> dict:
    import torch

    out = Path(tempfile.mkdtemp(prefix="bench_quality_")) / f"{kind}.pt"
    cmd = [sys.executable, __file__, "--child", kind, "--child-out", str(out),
           *(["--max-steps", str(args.max_steps)] if args.max_steps is not None else ["--budget", str(args.budget)])]
    env = dict(os.environ)
    if threads is not None:
        cmd += ["--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"[{kind}{'' if threads is None else f', {threads} thread'}] training for {describe(args)} ...",
          file=sys.stderr, flush=True)
    subprocess.run(cmd, env=env, check=True)
    return torch.load(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=900.0, help="training seconds for each (default 900)")
    parser.add_argument("--num-samples", type=int, default=5000, help="K of the IWAE-K evaluation")
    parser.add_argument("--num-test", type=int, default=10000, help="test images evaluated (the first ones)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of both (default: torch's)")
    parser.add_argument("--load", type=int, default=0, help="busy processes running during the benchmark")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="a budget in steps instead of seconds (the same for both; tests use it)")
    parser.add_argument("--quick", action="store_true", help="20 s budget, IWAE-100 on 500 images")
    parser.add_argument("--json", help="also write the JSON line to this file")
    parser.add_argument("--child", choices=("hand", "engine"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_steps is not None:  # a budget in steps replaces the one in seconds
        args.budget = None
    if args.child:
        return child(args)
    if args.quick:
        args.budget, args.num_samples, args.num_test = 20.0, 100, 500
    import torch

    from ppl_models.data.mnist import binarize, train_valid_test_images

    load = start_load(args.load) if args.load else None
    try:
        runs = {"engine": run_child("engine", args, args.threads), "hand": run_child("hand", args, args.threads)}
        if args.load:
            runs["engine_1thread"] = run_child("engine", args, 1)
    finally:
        if load is not None:
            load[0].set()
            for p in load[1]:
                p.join()
    x_test = binarize(train_valid_test_images(VALID, data_dir(), download=False)[2][: args.num_test], 1234)
    print(f"evaluating by IWAE-{args.num_samples} on {args.num_test} test images ...", file=sys.stderr, flush=True)
    nll = {}
    for name in ("engine", "hand"):
        torch.manual_seed(0)
        nll[name] = iwae_nll(runs[name], x_test, args.num_samples)
    diff = nll["engine"] - nll["hand"]
    se = lambda v: float(v.std() / math.sqrt(len(v)))  # noqa: E731
    rate = {k: r["steps"] / r["train_seconds"] for k, r in runs.items()}
    print(f"\nbudget {describe(args)} of training each; IWAE-{args.num_samples}, first {args.num_test} test images; "
          f"threads {args.threads or torch.get_num_threads()}; busy processes {args.load}")
    print(f"{'':34s} {'NLL (nats)':>16s} {'steps':>8s} {'steps/s':>8s}")
    for name, label in (("engine", "engine (README main job)"), ("hand", "hand-written eager PyTorch")):
        print(f"{label:34s} {nll[name].mean():9.2f} ± {se(nll[name]):4.2f} {runs[name]['steps']:8d} {rate[name]:8.1f}")
    print(f"{'engine - hand-written':34s} {diff.mean():9.2f} ± {se(diff):4.2f}   (paired over images)")
    result = {
        "budget_s": args.budget, "max_steps": args.max_steps,
        "num_samples": args.num_samples, "num_test": args.num_test, "load": args.load,
        "nll_engine": round(float(nll["engine"].mean()), 3), "nll_engine_se": round(se(nll["engine"]), 3),
        "nll_hand": round(float(nll["hand"].mean()), 3), "nll_hand_se": round(se(nll["hand"]), 3),
        "diff": round(float(diff.mean()), 3), "diff_se": round(se(diff), 3),
        "steps_engine": int(runs["engine"]["steps"]), "steps_hand": int(runs["hand"]["steps"]),
        "steps_per_s_engine": round(rate["engine"], 2), "steps_per_s_hand": round(rate["hand"], 2),
        "setup_s_engine": runs["engine"].get("setup_seconds"), "wall_s_engine": round(runs["engine"]["wall_seconds"], 1),
    }
    if args.load:
        result["steps_per_s_engine_1thread"] = round(rate["engine_1thread"], 2)
        result["load_ratio"] = round(rate["engine"] / rate["engine_1thread"], 3)
        print(f"under {args.load} busy processes: main job {rate['engine']:.1f} steps/s, one thread "
              f"{rate['engine_1thread']:.1f} steps/s, ratio {result['load_ratio']:.2f}")
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
