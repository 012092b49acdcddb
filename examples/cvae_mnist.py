"""MNIST image completion with the conditional VAE and its deterministic baseline (Pyro's ``examples/cvae``).

For each number of observed quadrants (1, 2, 3): train the baseline (examples/configs/cvae_mnist_baseline.toml),
then the CVAE on top of it (examples/configs/cvae_mnist.toml), estimate both test CLLs, draw a PNG grid
of completions, and print the table next to Pyro's tutorial's:

    python examples/cvae_mnist.py                  # 3 settings; each trains 150 s + 540 s, then evaluates
    python examples/cvae_mnist.py --num-quadrant-inputs 2 --cvae-time 60 --baseline-time 30 --limit-test 500

Writes <run-root>/q<N>/{baseline,cvae}/ (run directories), <run-root>/q<N>/completions.png and
<run-root>/results_q<N...>.json.  Pyro's table reports, per test image, the masked BCE of the baseline and
-ELBO (10 particles) of the CVAE; we report the same two numbers and the tighter importance-sampled
CLL (IWAE bound, K = --num-samples draws from the recognition network).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from ppl_models.atomic import atomic_write_bytes
from ppl_models.cvae import complete_images
from ppl_models.encodings import complete
from ppl_models.app.cli import report_errors
from ppl_models.app.experiment import Experiment
from ppl_models.tasks.plots import plot_image_grid

CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG, BASELINE_CONFIG = CONFIGS / "cvae_mnist.toml", CONFIGS / "cvae_mnist_baseline.toml"
#: Pyro's tutorial (cvae.ipynb), negative CLL in nats per test image, for 1 / 2 / 3 observed quadrants.
PYRO_TABLE = {"baseline": {1: 100.4, 2: 61.9, 3: 25.4}, "cvae": {1: 71.8, 2: 51.0, 3: 24.2}}


def seconds_or_none(text: str):
    """``--*-time``: seconds, or ``none`` for no time limit (a budget in epochs only, as tests use)."""
    return None if text.lower() == "none" else float(text)


def _overrides(args, q: int, time_limit) -> dict:
    out = {"model.num_quadrant_inputs": q, "data.num_quadrant_inputs": q, "train.seed": args.seed,
           "train.time_limit": time_limit, "train.progress": not args.no_progress}
    for flag, key in (("num_epochs", "train.num_epochs"), ("limit_train", "data.limit_train"),
                      ("limit_test", "data.limit_test"), ("data_dir", "data.data_dir")):
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    if args.hidden_dims is not None:
        out["model.hidden_dims"] = args.hidden_dims
    return out


def completions_grid(experiment, instance, baseline_modules, path, num_images=10, num_samples=5):
    """Rows: observed quadrants (grey: missing), truth, baseline, ``num_samples`` CVAE completions."""
    test = experiment.load_data()["test"]
    idx = torch.arange(min(num_images, test.num_data))
    x_obs, y = test.batch(idx, torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(experiment.config.train.seed)
        cvae = complete_images(x_obs, dict(instance.modules), num_samples)
    rows = [x_obs.clamp(min=0.0) + 0.35 * (x_obs < 0), complete_images(x_obs, {"baseline_net": baseline_modules}, 1)[0]]
    rows.insert(1, complete(x_obs, y, instance.modules["prior_net"].mask))
    title = "rows: input (grey = missing), truth, baseline NN, CVAE samples"
    return plot_image_grid(torch.cat(rows + list(cvae)), path, title, ncols=len(idx))


def run_setting(args, q: int) -> dict:
    root = Path(args.run_root) / f"q{q}"
    overrides = _overrides(args, q, args.baseline_time)
    base = Experiment.from_file(args.baseline_config, overrides, run_dir=root / "baseline")
    _, base_metrics = base.fit(num_samples=2)
    overrides = {**_overrides(args, q, args.cvae_time), "model.baseline_run": str(root / "baseline"),
                 "guide.hidden_dims": args.hidden_dims or [500, 500], "model.z_dim": args.z_dim}
    if args.hidden_dims is not None:
        overrides["model.baseline_hidden_dims"] = args.hidden_dims
    cvae = Experiment.from_file(args.config, overrides, run_dir=root / "cvae")
    result, metrics = cvae.fit(num_samples=args.num_samples)
    instance = cvae.build(1)  # fresh networks, then the trained weights
    cvae.trainer(cvae.load_data(), instance, progress=False).resume()
    grid = completions_grid(cvae, instance, instance.modules["baseline_net"], root / "completions.png")
    b, c = base_metrics.to_metrics(), metrics.to_metrics()
    return {
        "num_quadrant_inputs": q, "num_test": c["num_data"], "num_samples": c["num_samples"],
        "baseline_nll": -b["log_likelihood"], "baseline_nll_se": b["log_likelihood_se"],
        "cvae_neg_elbo": -c["elbo"], "cvae_neg_elbo_se": c["elbo_se"],
        "cvae_nll_iwae": -c["log_likelihood"], "cvae_nll_iwae_se": c["log_likelihood_se"],
        "cvae_epochs": result.epoch, "cvae_steps": result.step, "cvae_train_s": result.wall_time,
        "pareto_khat_frac_bad": c["pareto_khat_frac_bad"], "completions": str(grid) if grid else None,
    }


def main(args):
    rows = [run_setting(args, q) for q in args.num_quadrant_inputs]
    text = json.dumps(rows, indent=1) + "\n"
    name = "results_q" + "".join(str(q) for q in args.num_quadrant_inputs) + ".json"
    atomic_write_bytes(Path(args.run_root) / name, lambda f: f.write(text.encode()))
    print("negative test CLL, nats per image  | ours          | Pyro's tutorial")
    for r in rows:
        q = r["num_quadrant_inputs"]
        for label, key, pyro_value in (
            ("baseline NN        ", "baseline_nll", PYRO_TABLE["baseline"][q]),
            ("CVAE -ELBO (Pyro's)", "cvae_neg_elbo", PYRO_TABLE["cvae"][q]),
            (f"CVAE IWAE-{r['num_samples']:<9d}", "cvae_nll_iwae", ""),
        ):
            print(f"{q} quadrant(s)  {label}   | {r[key]:6.2f} ± {r[key + '_se']:.2f} | {pyro_value}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-quadrant-inputs", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--baseline-config", default=str(BASELINE_CONFIG))
    parser.add_argument("--baseline-time", type=seconds_or_none, default=150.0,
                        help="seconds of baseline training per setting ('none': --num-epochs alone bounds it)")
    parser.add_argument("--cvae-time", type=seconds_or_none, default=540.0,
                        help="seconds of CVAE training per setting ('none': --num-epochs alone bounds it)")
    parser.add_argument("--num-epochs", type=int, default=None,
                        help="default: the configs' (50; the time limit stops first)")
    parser.add_argument("--num-samples", type=int, default=64, help="importance samples K for the CVAE's CLL")
    parser.add_argument("--z-dim", type=int, default=200)
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=None, help="default: the configs' [500, 500]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--limit-test", type=int, default=None)
    parser.add_argument("--run-root", default="runs/cvae_mnist")
    parser.add_argument("--no-progress", action="store_true")
    sys.exit(report_errors(main)(parser.parse_args()))
