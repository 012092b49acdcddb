"""Threads and OpenMP's wait policy on an idle and on a busy machine: the measurements behind the thread tuner.

For each load (no other process, then ``--load`` busy processes, one spinning Python loop each), one child
process per setting trains the main job's VAE step (784-200-200-50, batch 128, Adam; the hand-written step of
``bench_quality.py``) for ``--seconds`` and reports steps/s:

* ``1 thread``                — ``OMP_NUM_THREADS=1``: the reference a loaded machine should not fall below;
* ``all threads, ACTIVE``     — torch's default thread count with OpenMP spinning while it waits (the OpenMP
  default the package used to inherit);
* ``all threads, PASSIVE``    — the same with ``OMP_WAIT_POLICY=PASSIVE``.

Printed: steps/s and the ratio of each setting to ``1 thread`` under the same load, and one JSON line.  PASSIVE
rescues the loaded case but is slower than ACTIVE on an idle machine, so the package sets neither: its thread
tuner (``ppl_models/infer/threads.py``) chooses between one thread and all at run time.

    python benchmarks/bench_threads.py                # 15 s per setting, load 3
    python benchmarks/bench_threads.py --seconds 5    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import start_load  # noqa: E402  (the benchmarks' one competing load)

SETTINGS = {
    "1 thread": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
    "all threads, ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "all threads, PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def child(seconds: float) -> None:
    import time

    import torch

    from bench_quality import hand_loss, hand_networks

    torch.manual_seed(0)
    encoder, decoder = hand_networks()
    optim = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    x = torch.bernoulli(torch.rand(128, 784) * 0.3)

    def step():
        loss = hand_loss(encoder, decoder, x)
        optim.zero_grad()
        loss.backward()
        optim.step()

    for _ in range(20):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    print(json.dumps({"steps_per_s": steps / (time.perf_counter() - start), "threads": torch.get_num_threads()}))


def measure(setting: str, seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(SETTINGS[setting])
    out = subprocess.run([sys.executable, __file__, "--child", str(seconds)], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per setting")
    parser.add_argument("--load", type=int, default=3, help="busy processes of the loaded case")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.child)
    result = {}
    for load in (0, args.load):
        stop, procs = start_load(load)
        try:
            rows = {s: measure(s, args.seconds) for s in SETTINGS}
        finally:
            stop.set()
            for p in procs:
                p.join()
        ref = rows["1 thread"]["steps_per_s"]
        print(f"\n{load} busy processes")
        for s, r in rows.items():
            print(f"  {s:22s} {r['threads']} threads {r['steps_per_s']:8.1f} steps/s   {r['steps_per_s'] / ref:5.2f} x 1 thread")
        result[f"load{load}"] = {s: round(r["steps_per_s"], 1) for s, r in rows.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
