"""Training throughput with 1 and 2 data-parallel processes (torch.distributed, gloo, DDP) on this machine.

The job is the package's MNIST VAE, 784-400-20 with the amortized guide, ``Trace_ELBO``, Adam 1e-3, the
same global batch (default 128) in every configuration, trained by the package's own loop (the engine's
``Trainer.fit`` with its ``DataParallel`` option: shuffling, dynamic binarization, the step; no checkpoints,
no validation).
Configurations, each a fresh job started by torch's launcher (``launch``, i.e. torchrun ``--standalone``):

* ``p1_t1``  1 process, 1 thread;
* ``p1_t2``  1 process, 2 threads (the fair single-process reference on a 2-core machine);
* ``p2_t1``  2 processes, 1 thread each: every process computes half of each global batch and the
  networks' gradients are all-reduced (sum) over loopback gloo.

In each job, rank 0 times ``--steps`` steps after ``--warmup`` steps, between two barriers, and every
process reports its CPU time over those steps (``time.process_time``, all its threads).  On a machine that
other jobs load, wall-clock throughput mostly measures the share of the cores a job gets; the CPU time per
step of the busiest process is what would bound the step on an otherwise idle machine (a projection,
printed as such: it ignores time spent waiting for the other process).  Process
start-up and the first steps are not in the figure; the job's wall time is reported apart.  Rounds
rotate the order of the configurations; reported: median datapoints/s over rounds and the median of
each round's ratio to ``p1_t1`` and to ``p1_t2`` (measurements taken within a minute of each other).
The machine may be shared: the script prints the load average before and after.

The last line printed is one JSON object with every figure.

    python benchmarks/bench_distributed.py                 # 3 rounds x 300 steps, real MNIST
    python benchmarks/bench_distributed.py --quick --simulated
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {  # name: (processes, threads per process)
    "p1_t1": (1, 1),
    "p1_t2": (1, 2),
    "p2_t1": (2, 1),
}


def worker(spec: dict) -> None:
    """One process of a benchmark job (started by the launcher)."""
    import pyro
    import torch
    import torch.distributed as dist

    import ppl_models as pm
    from harness import pixel_probs
    from ppl_models.data import DynamicBinarized
    from ppl_models.infer import Trainer
    from ppl_models.infer.distributed import DataParallel, process_group

    torch.set_num_threads(spec["threads"])
    probs, source = pixel_probs(spec["simulated"], spec["num_data"], spec["seed"])
    data = DynamicBinarized(probs)
    with process_group("cpu"):
        pyro.clear_param_store()
        pyro.set_rng_seed(spec["seed"])
        inst = pm.instantiate("vae", "amortized", num_data=data.num_data)
        marks = {}

        def callback(trainer, step, loss):
            if step in (spec["warmup"], spec["warmup"] + spec["steps"]):
                dist.barrier()
                marks[step] = (time.perf_counter(), time.process_time())

        trainer = Trainer(
            inst.model, inst.guide, data, parallel=DataParallel(inst.modules), elbo="Trace_ELBO", lr=1e-3,
            batch_size=spec["batch_size"], num_epochs=10**6, max_steps=spec["warmup"] + spec["steps"],
            seed=spec["seed"], progress=False, callback=callback,
        )
        trainer.fit()
        (wall0, cpu0), (wall1, cpu1) = marks[spec["warmup"]], marks[spec["warmup"] + spec["steps"]]
        cpu_per_rank = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((cpu1 - cpu0) / spec["steps"], cpu_per_rank, dst=0)
        if dist.get_rank() == 0:
            seconds = wall1 - wall0
            result = {"seconds": seconds, "steps": spec["steps"], "source": source, "cpu_s_per_step": cpu_per_rank,
                      "world_size": dist.get_world_size(), "threads": torch.get_num_threads(),
                      "final_elbo_per_datapoint": -trainer.history["log_train_elbo"][-1]
                      if trainer.history["log_train_elbo"] else None}
            Path(spec["out"]).write_text(json.dumps(result))


def run_job(name: str, args, out: Path) -> dict:
    from ppl_models.infer.distributed import launch

    nproc, threads = CONFIGS[name]
    spec = {"threads": threads, "simulated": args.simulated, "num_data": args.num_data, "seed": args.seed,
            "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps, "out": str(out)}
    os.environ["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    launch(nproc, ["--worker", json.dumps(spec)], script=str(Path(__file__).resolve()))
    result = json.loads(out.read_text())
    result["job_wall_s"] = time.perf_counter() - start
    result["datapoints_per_s"] = args.steps * args.batch_size / result["seconds"]
    result["steps_per_s"] = args.steps / result["seconds"]
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="timed steps per job")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=128, help="the global batch, the same in every configuration")
    p.add_argument("--num-data", type=int, default=None, help="rows of the training set (default: all of MNIST train)")
    p.add_argument("--simulated", action="store_true", help="pixels of a random decoder instead of MNIST")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round x 5 steps (+2), N <= 1000")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated configurations to run (default: all of {', '.join(CONFIGS)}); "
                        "p1_t1 is the reference and always runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return {}
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 5, 2
        args.num_data = min(args.num_data or 1000, 1000)

    import torch
    import pyro

    load_before = os.getloadavg()
    names = ["p1_t1"] + [n for n in args.configs.split(",") if n and n != "p1_t1"]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown configuration {unknown[0]!r}; valid: {', '.join(CONFIGS)}")
    results = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                results[name].append(run_job(name, args, Path(tmp) / f"{name}-{r}.json"))
                print(f"round {r + 1}/{args.rounds} {name}: {results[name][-1]['datapoints_per_s']:.0f} datapoints/s "
                      f"(job {results[name][-1]['job_wall_s']:.1f} s wall)", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    rate = {n: [x["datapoints_per_s"] for x in results[n]] for n in names}
    # CPU time per global step (process_time, every thread of a process), which other jobs' load disturbs
    # far less than wall time: the busiest process bounds the step on an otherwise idle machine.
    cpu_max = {n: statistics.median(max(x["cpu_s_per_step"]) for x in results[n]) for n in names}
    cpu_sum = {n: statistics.median(sum(x["cpu_s_per_step"]) for x in results[n]) for n in names}
    summary = {n: statistics.median(rate[n]) for n in names}
    refs = [r for r in ("p1_t1", "p1_t2") if r in names]
    ratios = {ref: {n: statistics.median([a / b for a, b in zip(rate[n], rate[ref])]) for n in names} for ref in refs}
    source = results[names[0]][0]["source"]
    print(f"VAE 784-400-20, amortized guide, Trace_ELBO, global batch {args.batch_size}, data {source}")
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {os.cpu_count()} CPUs; "
          f"{args.rounds} rounds x {args.steps} timed steps (+{args.warmup}); load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs share this machine)")
    head = (f"{'configuration':<34} {'datapoints/s':>12} {'min':>8} {'max':>8}" + "".join(f" {'/' + r:>8}" for r in refs)
            + f" {'job wall s':>10}")
    print(head)
    print("-" * len(head))
    labels = {"p1_t1": "1 process x 1 thread", "p1_t2": "1 process x 2 threads", "p2_t1": "2 processes x 1 thread (gloo)"}
    for n in names:
        print(f"{labels[n]:<34} {summary[n]:12.0f} {min(rate[n]):8.0f} {max(rate[n]):8.0f}"
              + "".join(f" {ratios[r][n]:8.3f}" for r in refs)
              + f" {statistics.median(x['job_wall_s'] for x in results[n]):10.1f}")
    print("CPU ms per global step (process_time; max over processes / sum over processes):")
    for n in names:
        print(f"  {labels[n]:<32} {1e3 * cpu_max[n]:7.2f} / {1e3 * cpu_sum[n]:7.2f}   "
              f"step bound on an idle machine vs p1_t1: x{cpu_max['p1_t1'] / cpu_max[n]:.2f}")
    out = {
        "benchmark": "distributed",
        "datapoints_per_s": summary,
        "steps_per_s": {n: summary[n] / args.batch_size for n in names},
        **{f"ratio_vs_{r}": ratios[r] for r in refs},
        "job_wall_s": {n: statistics.median(x["job_wall_s"] for x in results[n]) for n in names},
        "cpu_ms_per_step_max_over_processes": {n: 1e3 * cpu_max[n] for n in names},
        "cpu_ms_per_step_sum_over_processes": {n: 1e3 * cpu_sum[n] for n in names},
        "cpu_bound_speedup_vs_p1_t1": {n: cpu_max["p1_t1"] / cpu_max[n] for n in names},
        "configs": {n: {"processes": CONFIGS[n][0], "threads": CONFIGS[n][1]} for n in names},
        "load_average_before_after": [load_before[0], load_after[0]],
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "data": "simulated" if args.simulated else "mnist",
        "torch": torch.__version__,
        "pyro": pyro.__version__,
    }
    print(json.dumps(out))
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    main()
