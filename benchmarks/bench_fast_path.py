"""Steps per second of the engine's fast path against hand-written PyTorch, Pyro and (optionally) NumPyro.

The problem is the package's MNIST VAE, 784-400-20, batch 128, Adam lr 1e-3 (as ``bench_vae_step.py``).
Every implementation starts from the same weights and consumes the same dynamically binarized batches.

Implementations:

a. ``hand``          hand-written eager PyTorch, ``torch.optim.Adam`` (default: single-tensor on CPU);
b. ``hand_fused``    the same with ``Adam(fused=True)``;
c. ``pyro_module``   Pyro's ``Trace_ELBO()(model, guide)`` module + ``torch.optim.Adam``;
d. ``engine_pyro``   the engine's ``Trainer.train_step`` with ``Trace_ELBO``, Pyro every step (``fast_path=False``);
e. ``fast_eager``    the engine with ``fast_path="eager"``: Pyro's ``Trace_ELBO`` captured once, run eagerly;
f. ``fast_compile``  the engine with ``fast_path="compile"``: loss and gradients of the captured graph as one
                     graph compiled by inductor;
g. ``numpyro``       only when ``jax`` and ``numpyro`` import (``--extra-path DIR`` appends DIR to
                     ``sys.path``; they are never a dependency of the package): the same model and guide in
                     NumPyro, ``jax.jit(svi.update)`` with ``numpyro.optim.Adam``, Trace_ELBO;
h. ``numpyro_donate`` the same with ``donate_argnums=0``: XLA updates the SVI state's buffers in place.

Losses: all are the N/batch-scaled -ELBO estimate of the whole data set.  a and b use the analytic KL
(as in ``bench_vae_step.py``); c-g use Trace_ELBO's Monte Carlo ``log q - log p``.

Timing (``benchmarks/harness.py``): one process, warm-up, then ``--rounds`` rounds in which each
implementation runs ``--steps`` steps, the order rotated per round; reported: median steps/s and the
median of the per-round ratio to ``hand``.  The machine may be loaded by other jobs: trust the per-round
ratios more than the steps/s.

Latency: ``first_two_steps_s`` is the wall time from building an implementation to the end of its second
step (the engine's first step is Pyro's validated step; its second is the first fast step: capture and,
for ``fast_compile``, compilation).  Compilation uses a fresh inductor cache directory unless
``--warm-cache`` (a cold compile, as a user's first run sees it).

Threads: ``--threads K`` sets torch's threads; jax/XLA runs threads of its own, so for a fair one-core
comparison pin the whole run with ``--cpus 0`` (``os.sched_setaffinity``; subprocesses inherit it).

Memory (``--rss``, default on; ``--no-rss`` skips it): each implementation again in a fresh subprocess,
``--rss-steps`` steps; its peak RSS (``VmHWM``), and the same minus the RSS before the
implementation was built (after imports, data and batches), each relative to ``hand``.

Checks: the hand-written loss equals Pyro's ``TraceMeanField_ELBO`` (same weights and noise), and the
fast path's captured loss equals Pyro's ``Trace_ELBO`` (same weights and noise).

The last line is one JSON object with every figure.

    python benchmarks/bench_fast_path.py --threads 1 --cpus 0
    python benchmarks/bench_fast_path.py --quick --simulated --no-rss
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO

import ppl_models as pm
from bench_vae_step import hand_step, loss_check
from harness import (
    HIDDEN, X_DIM, Z_DIM, Impl, emit, fresh_instance, measure, parser, prepare, print_table, pyro_scope, run_info,
    summarize,
)
from ppl_models.infer import Trainer
from ppl_models.infer.capture import capture_loss

HERE = Path(__file__).resolve().parent
GOALS = {"fast_vs_hand": 1.5, "fast_vs_numpyro": 1.0, "first_step_s": 30.0, "rss_vs_hand": 1.2}
NAMES = ("hand", "hand_fused", "pyro_module", "engine_pyro", "fast_eager", "fast_compile", "numpyro",
         "numpyro_donate")


# ------------------------------------------------------------------------------ implementations
def make_impl(name: str, base, data, batches, num_data: int, batch_size: int, lr: float):
    """Build implementation ``name``; returns an :class:`Impl` (``None``: not available here)."""
    scale = num_data / batch_size
    if name in ("hand", "hand_fused"):
        label = "a. hand-written, Adam" if name == "hand" else "b. hand-written, Adam fused"
        return Impl(name, label, hand_step(base, lr, name == "hand_fused", scale))
    if name == "pyro_module":
        inst = fresh_instance(base, "amortized", num_data)
        loss_fn = Trace_ELBO()(inst.model, inst.guide)
        opt = torch.optim.Adam(inst.modules.parameters(), lr=lr)

        def step(batch, loss_fn=loss_fn, opt=opt):
            (x,), idx = batch
            opt.zero_grad()
            loss = loss_fn(x, idx, num_data=num_data)
            loss.backward()
            opt.step()
            return loss.item()

        return Impl(name, "c. Pyro Trace_ELBO()(model, guide) + Adam", step, pyro_scope(validation=False))
    if name in ("engine_pyro", "fast_eager", "fast_compile"):
        mode = {"engine_pyro": False, "fast_eager": "eager", "fast_compile": "compile"}[name]
        inst = fresh_instance(base, "amortized", num_data)
        trainer = Trainer(inst.model, inst.guide, data, elbo="Trace_ELBO", lr=lr, batch_size=batch_size,
                          progress=False, fast_path=mode)
        label = {
            "engine_pyro": "d. engine, Pyro Trace_ELBO every step",
            "fast_eager": "e. engine fast path, eager",
            "fast_compile": "f. engine fast path, compiled",
        }[name]
        impl = Impl(name, label, lambda batch, t=trainer: t.train_step(batch[0], batch[1]), pyro_scope())
        impl.trainer = trainer
        return impl
    if name in ("numpyro", "numpyro_donate"):
        return make_numpyro(base, num_data, batch_size, lr, donate=name == "numpyro_donate")
    raise ValueError(name)


def make_numpyro(base, num_data: int, batch_size: int, lr: float, donate: bool = False):
    """NumPyro's jitted SVI on the same model, guide and weights (``None`` when jax/numpyro do not import);
    ``donate``: the state's buffers donated to the update (``donate_argnums=0``)."""
    try:
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as ndist
        from numpyro.infer import SVI, Trace_ELBO as NTrace_ELBO
    except Exception:  # an optional extra
        return None
    enc, dec = base.modules["encoder"], base.modules["decoder"]
    weights = {
        "enc_w": enc.body[0][0].weight, "enc_b": enc.body[0][0].bias,
        "loc_w": enc.z_loc.weight, "loc_b": enc.z_loc.bias,
        "scale_w": enc.z_scale.weight, "scale_b": enc.z_scale.bias,
        "dec1_w": dec.net[0].weight, "dec1_b": dec.net[0].bias,
        "dec2_w": dec.net[2].weight, "dec2_b": dec.net[2].bias,
    }
    init = {k: jnp.asarray(v.detach().numpy()) for k, v in weights.items()}
    scale = num_data / batch_size

    def model(x):
        p = {k: numpyro.param(k, init[k]) for k in ("dec1_w", "dec1_b", "dec2_w", "dec2_b")}
        with numpyro.handlers.scale(scale=scale), numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", ndist.Normal(0.0, 1.0).expand([Z_DIM]).to_event(1))
            h = jax.nn.relu(z @ p["dec1_w"].T + p["dec1_b"])
            logits = h @ p["dec2_w"].T + p["dec2_b"]
            numpyro.sample("x", ndist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x):
        p = {k: numpyro.param(k, init[k]) for k in ("enc_w", "enc_b", "loc_w", "loc_b", "scale_w", "scale_b")}
        h = jax.nn.relu(x @ p["enc_w"].T + p["enc_b"])
        z_loc = h @ p["loc_w"].T + p["loc_b"]
        z_scale = jax.nn.softplus(h @ p["scale_w"].T + p["scale_b"])
        with numpyro.handlers.scale(scale=scale), numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", ndist.Normal(z_loc, z_scale).to_event(1))

    svi = SVI(model, guide, numpyro.optim.Adam(lr), NTrace_ELBO())
    box = {}
    update = jax.jit(svi.update, donate_argnums=0) if donate else jax.jit(svi.update)
    cache = {}

    def step(batch):
        (x,), _ = batch
        key = id(x)
        if key not in cache:
            cache[key] = jnp.asarray(x.numpy())
        xj = cache[key]
        if "state" not in box:
            box["state"] = svi.init(jax.random.PRNGKey(0), xj)
        box["state"], loss = update(box["state"], xj)
        return float(loss)

    if donate:
        return Impl("numpyro_donate", "h. NumPyro, the same with donate_argnums=0", step)
    label = f"g. NumPyro {numpyro.__version__} jax.jit(svi.update) (jax {jax.__version__})"
    return Impl("numpyro", label, step)


def fast_loss_check(base, batch, num_data: int) -> dict:
    """Same weights and noise: the fast path's captured Trace_ELBO loss against Pyro's own."""
    (x,), idx = batch
    inst = fresh_instance(base, "amortized", num_data)
    with pyro.get_param_store().scope(), torch.random.fork_rng(devices=[]):
        elbo = Trace_ELBO(max_plate_nesting=1)
        with pyro.validation_enabled(False):
            elbo.differentiable_loss(inst.model, inst.guide, x, idx, num_data=num_data)  # registers the parameters
            cap = capture_loss(elbo, inst.model, inst.guide, (x, idx), {"num_data": num_data})
            torch.manual_seed(1234)
            fast = cap((x, idx)).item()
            torch.manual_seed(1234)
            ref = elbo.differentiable_loss(inst.model, inst.guide, x, idx, num_data=num_data).item()
    return {"fast": fast, "pyro_Trace_ELBO": ref, "rel_diff": abs(fast - ref) / abs(ref)}


def timed_first_steps(impl, batches) -> float:
    """Seconds for the first two steps of a freshly built implementation."""
    start = time.perf_counter()
    with impl.context():
        for i in range(2):
            impl.step(batches[i % len(batches)])
    return time.perf_counter() - start


def build(args, names, base, data, batches, num_data):
    impls, first = [], {}
    for name in names:
        start = time.perf_counter()
        impl = make_impl(name, base, data, batches, num_data, args.batch_size, args.lr)
        if impl is None:
            continue
        built = time.perf_counter() - start
        first[name] = built + timed_first_steps(impl, batches)
        impls.append(impl)
    return impls, first


# ------------------------------------------------------------------------------ memory, in fresh processes
def child(args) -> None:
    """``--child NAME``: build one implementation, run ``--rss-steps`` steps, print its figures as JSON."""
    warmup, data, source, batches = prepare(args)
    num_data = data.num_data
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    base = pm.instantiate("vae", "amortized", num_data=num_data)
    before = vm_hwm_kib()
    start = time.perf_counter()
    impl = make_impl(args.child, base, data, batches, num_data, args.batch_size, args.lr)
    first = timed_first_steps(impl, batches) + (time.perf_counter() - start) if impl is not None else None
    if impl is not None:
        with impl.context():
            for i in range(args.rss_steps):
                impl.step(batches[i % len(batches)])
    peak = vm_hwm_kib()
    print(json.dumps({"name": args.child, "available": impl is not None, "rss_before_kib": before,
                      "rss_peak_kib": peak, "first_two_steps_s": first}))


def vm_hwm_kib() -> int:
    """Peak RSS of this process in KiB: ``VmHWM`` (``ru_maxrss`` would carry the parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_children(args, names) -> dict:
    out = {}
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--rss-steps", str(args.rss_steps),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
               "--steps", str(args.steps)]
        for flag in ("num_data", "threads", "extra_path"):
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        if args.simulated:
            cmd.append("--simulated")
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(HERE), env=os.environ.copy())
        if proc.returncode != 0:
            raise RuntimeError(f"child {name} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if result["available"]:
            out[name] = result
    return out


# ------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0], None, "rows of the data set (all / 10000 simulated)")
    p.add_argument("--rss", dest="rss", action="store_true", default=True, help="measure peak RSS in subprocesses")
    p.add_argument("--no-rss", dest="rss", action="store_false")
    p.add_argument("--rss-steps", type=int, default=200, help="steps of each memory subprocess")
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's default cache (else a fresh one)")
    p.add_argument("--extra-path", default=None, help="a directory appended to sys.path (e.g. where jax is)")
    p.add_argument("--cpus", default=None,
                   help="pin this process and its subprocesses to these CPUs, e.g. 0 (fair 1-core runs: jax "
                        "otherwise runs extra threads that --threads does not limit)")
    p.add_argument("--impls", default=",".join(NAMES), help="comma-separated subset of " + ", ".join(NAMES))
    p.add_argument("--child", default=None, help=argparse_suppress())
    args = p.parse_args(argv)
    if args.extra_path:
        sys.path.append(args.extra_path)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    if args.child:
        return child(args)
    if not args.warm_cache and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    warmup, data, source, batches = prepare(args)
    num_data = data.num_data

    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    base = pm.instantiate("vae", "amortized", num_data=num_data)
    check = loss_check(base, batches[0], num_data, args.batch_size)
    fcheck = fast_loss_check(base, batches[0], num_data)
    names = [n for n in args.impls.split(",") if n]
    unknown = sorted(set(names) - set(NAMES))
    if unknown or "hand" not in names:
        raise SystemExit(f"--impls: expected a subset of {', '.join(NAMES)} including hand, received {args.impls!r}")
    impls, first = build(args, names, base, data, batches, num_data)
    by_name = impls_by_name(impls)
    compile_s = by_name["fast_compile"].trainer._fast.compile_seconds if "fast_compile" in by_name else None
    pyro.set_rng_seed(args.seed)
    rates = measure(impls, batches, args.rounds, args.steps, warmup)
    refs = tuple(r for r in ("hand", "hand_fused", "numpyro", "numpyro_donate") if r in rates)
    summary = summarize(impls, rates, refs)
    mem = run_children(args, [i.name for i in impls]) if args.rss else {}

    print(f"VAE {X_DIM}-{HIDDEN}-{Z_DIM} training step, batch {args.batch_size}, data {source} (N={num_data})")
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps (+{warmup} warm-up), medians over rounds; "
          f"inductor cache {'warm (default)' if args.warm_cache else 'fresh (cold compile)'}")
    print(f"loss checks: hand vs TraceMeanField_ELBO rel. diff {check['rel_diff']:.1e}; "
          f"fast path vs Trace_ELBO rel. diff {fcheck['rel_diff']:.1e}")
    print_table(impls, rates, summary, refs)
    print()
    print(f"{'implementation':<52} {'first 2 steps s':>16} {'peak RSS MiB':>13} {'/hand':>7} "
          f"{'above base MiB':>15} {'/hand':>7}")
    hand_mem = mem.get("hand")
    rss_ratio, rss_above_ratio = {}, {}
    for impl in impls:
        m = mem.get(impl.name)
        line = f"{impl.label:<52} {first[impl.name]:16.2f}"
        if m and hand_mem:
            rss_ratio[impl.name] = m["rss_peak_kib"] / hand_mem["rss_peak_kib"]
            above = m["rss_peak_kib"] - m["rss_before_kib"]
            hand_above = hand_mem["rss_peak_kib"] - hand_mem["rss_before_kib"]
            rss_above_ratio[impl.name] = above / max(1, hand_above)
            line += (f" {m['rss_peak_kib'] / 1024:13.0f} {rss_ratio[impl.name]:7.2f}"
                     f" {above / 1024:15.0f} {rss_above_ratio[impl.name]:7.2f}")
        print(line)
    ratio_hand = summary["ratio_vs"]["hand"]
    fast = {k: ratio_hand[k] for k in ("fast_eager", "fast_compile") if k in ratio_hand}
    goal_met = {
        "fast_vs_hand": {k: v >= GOALS["fast_vs_hand"] for k, v in fast.items()},
        "first_step_s": {k: first[k] <= GOALS["first_step_s"] for k in fast},
    }
    for ref in ("numpyro", "numpyro_donate"):
        if ref in rates:
            goal_met[f"fast_vs_{ref}"] = {k: summary["ratio_vs"][ref][k] >= 1.0 for k in fast}
    if rss_ratio:
        goal_met["rss_vs_hand"] = {k: rss_ratio[k] <= GOALS["rss_vs_hand"] for k in fast if k in rss_ratio}
    rate = summary["steps_per_s"]
    eager_ms = 1000 / rate["fast_eager"] if "fast_eager" in rate else None
    compiled_ms = 1000 / rate["fast_compile"] if "fast_compile" in rate else None
    result = {
        "benchmark": "fast_path",
        "steps_per_s": summary["steps_per_s"],
        **{f"ratio_vs_{ref}": summary["ratio_vs"][ref] for ref in refs},
        "fast_vs_hand": fast,
        "first_two_steps_s": first,
        "compile_s": compile_s,
        "compile_breakeven_steps": (
            compile_s / ((eager_ms - compiled_ms) / 1000)
            if compile_s and eager_ms and compiled_ms and eager_ms > compiled_ms else None
        ),
        "first_two_steps_s_fresh_process_warm_cache": {k: v["first_two_steps_s"] for k, v in mem.items()},
        "rss_peak_mib": {k: v["rss_peak_kib"] / 1024 for k, v in mem.items()},
        "rss_vs_hand": rss_ratio,
        "rss_above_base_vs_hand": rss_above_ratio,
        "goal": GOALS,
        "goal_met": goal_met,
        "numpyro": "numpyro" in rates,
        "loss_check": check,
        "fast_loss_check": fcheck,
        **run_info(args, warmup),
        "num_data": num_data,
        "data": "simulated" if args.simulated else "mnist",
        "inductor_cache": "warm" if args.warm_cache else "cold",
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    return emit(result)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def impls_by_name(impls):
    return {impl.name: impl for impl in impls}


if __name__ == "__main__":
    main()
