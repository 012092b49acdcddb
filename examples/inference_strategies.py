"""From "inference as optimization" to "inference as prediction", on MNIST with one decoder.

Trains the VAE's decoder (the same initialisation each time) with each inference strategy of the lecture on the
same wall-time budget, then evaluates every one the same way on the same test images:

* ``svi-local``       joint SVI over θ and a stored λ_i per training image;
* ``svi-inner``       per minibatch, K gradient steps on a fresh λ0 = the prior with θ fixed, then one θ step;
* ``amortized``       λ = enc_φ(x) (the VAE);
* ``semi-amortized``  λ0 = enc_φ(x) refined by K steps (Kim et al. 2018), the gradient stopped through the
  refinement; ``semi-amortized-end-to-end`` differentiates through it.

Test images' λ: the encoder (amortized), the encoder and its K refinement steps (semi-amortized), or
``[evaluate] refine_steps`` Adam steps from the prior (svi-local, svi-inner: they have no λ for new images).
For the amortized VAE it also reports the amortization gap: the test ELBO with the encoder's λ, after refining
λ for K = 20 and K = 100 steps (the semi-amortized inner loop), and the IWAE bound, with paired standard errors.

Settings come from ``examples/configs/inference_strategies.toml`` (``--config``); flags override them.

    python examples/inference_strategies.py                            # 180 s per strategy, 1000 test images
    python examples/inference_strategies.py --budget 150 --num-test 1000 --num-samples 1000
    python examples/inference_strategies.py --max-steps 4 --num-test 8 --num-samples 4 --limit-train 256 \\
        -o model.hidden_dims=[32] -o evaluate.refine_steps=5 --gap-steps 2 5            # smoke test

``--max-steps N`` replaces the wall-time budget by N θ steps per strategy: the same work on any machine
(the smoke test and tests/test_examples.py use it), where ``--budget`` compares strategies at equal time.

Writes ``strategies.json``, ``strategies.csv`` and ``strategies.png`` to --out (default: the config's run_dir).
"""

import argparse
import csv
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ppl_models.app.cli import report_errors  # noqa: E402
from ppl_models.atomic import atomic_write_bytes  # noqa: E402
from ppl_models.app.config import GuideConfig, load_config, parse_override  # noqa: E402
from ppl_models.infer.evaluate import evaluate  # noqa: E402
from ppl_models.app.experiment import Experiment  # noqa: E402
from ppl_models.infer.strategies import RefiningGuide, guide_for_strategy, inference_guide, inner_loop  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs" / "inference_strategies.toml"

#: Rows of the table: name -> ([train] strategy, [train] refine_grad).
ROWS = {
    "svi-local": ("svi-local", "stop"),
    "svi-inner": ("svi-inner", "stop"),
    "amortized": ("amortized", "stop"),
    "semi-amortized": ("semi-amortized", "stop"),
    "semi-amortized-end-to-end": ("semi-amortized", "end-to-end"),
}


def paired(a: np.ndarray, b: np.ndarray):
    """Mean of b - a over the test images and its standard error (the same images, the same draws' seed)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def load(args):
    overrides = dict(parse_override(text) for text in args.overrides)
    if args.budget is not None:
        overrides["train.time_limit"] = args.budget
    if args.max_steps is not None:  # a budget in θ steps instead of seconds
        overrides.update({"train.max_steps": args.max_steps, "train.time_limit": None})
    for flag, key in (("num_test", "data.limit_test"), ("num_samples", "evaluate.num_samples"),
                      ("limit_train", "data.limit_train"), ("refine_steps", "evaluate.refine_steps"),
                      ("seed", "train.seed"), ("data_dir", "data.data_dir")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    overrides["train.progress"] = not args.no_progress
    return load_config(args.config, overrides)


def main(args):
    config = load(args)
    out = Path(args.out or config.output.run_dir)
    splits = Experiment(config, out).load_data()
    train, test = splits["train"], splits["test"]
    t = config.train
    budget = (f"{t.time_limit:g} s" if t.time_limit is not None
              else f"{t.max_steps} θ steps" if t.max_steps is not None else "the configured epochs")
    ev = config.evaluate
    rows, curves, gap, decoder_init = [], {}, None, None
    # The first torch optimizer imports torch._dynamo (seconds on a loaded machine): not inside a budget.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    for key in args.strategies:
        strategy, refine_grad = ROWS[key]
        run_config = config.with_overrides({"train.strategy": strategy, "train.refine_grad": refine_grad})
        if guide_for_strategy(strategy) != "amortized-mlp":  # [guide] sizes the encoder; the others have none
            run_config = dataclasses.replace(run_config, guide=GuideConfig())
        experiment = Experiment(run_config, out / key)
        inst = experiment.build(train.num_data)  # fresh networks from the run's seed: the decoder is built first
        init = float(sum(p.detach().double().sum() for p in inst.modules["decoder"].parameters()))
        if decoder_init is not None and init != decoder_init:
            raise RuntimeError(f"{key}: the decoder's initialisation differs from the first strategy's")
        decoder_init = init
        seconds, elbos = [], []
        start = time.perf_counter()

        def record(trainer, step, loss):
            if step % 10 == 0:
                seconds.append(time.perf_counter() - start)
                elbos.append(-loss / trainer.num_data)

        trainer = experiment.trainer(splits, inst, valid=None, run_dir=None, callback=record)
        result = trainer.fit()
        wall = time.perf_counter() - start
        loop = inner_loop("test", num_steps=ev.refine_steps)
        guide = inference_guide(strategy, inst.model, inst.spec, inst.guide, loop=loop)
        start = time.perf_counter()
        res = evaluate(inst.model, guide, test, spec=inst.spec, num_samples=ev.num_samples, batch_size=ev.batch_size,
                       progress=False, generator=torch.Generator().manual_seed(1))
        eval_wall = time.perf_counter() - start
        (elbo, elbo_se), (ll, ll_se) = res.mean_and_se("elbo"), res.mean_and_se("log_likelihood")
        if strategy == "amortized":
            test_lambda = "enc(x)"
        elif strategy == "semi-amortized":
            test_lambda = f"enc(x) + {inst.guide.num_steps} {inst.guide.loop.optimizer} steps"
        else:
            test_lambda = f"{loop.num_steps} {loop.optimizer} steps from the prior"
        rows.append({
            "strategy": key, "theta_steps": result.step, "epochs": round(result.step / trainer.num_batches, 2),
            "wall_time_s": round(wall, 1), "test_elbo": round(elbo, 3), "test_elbo_se": round(elbo_se, 3),
            "test_nll": round(-ll, 3), "test_nll_se": round(ll_se, 3),
            "test_lambda": test_lambda,
            "eval_wall_time_s": round(eval_wall, 1),
        })
        curves[key] = (seconds, elbos)
        print(f"{key:26s} {result.step:6d} θ steps {wall:6.1f} s  test ELBO {elbo:8.2f} ± {elbo_se:.2f}  "
              f"test NLL {-ll:8.2f} ± {ll_se:.2f}  (evaluation {eval_wall:.0f} s)", flush=True)
        if strategy == "amortized" and args.gap_steps:
            gap = {"num_test": int(test.num_data), "elbo_encoder": elbo, "iwae": ll,
                   "iwae_minus_elbo_encoder": paired(res.elbo, res.log_likelihood)}
            for k in args.gap_steps:
                refined = RefiningGuide(inst.model, inst.spec, loop=inner_loop("semi-amortized", num_steps=k),
                                        encoder=inst.modules["encoder"])
                rk = evaluate(inst.model, refined, test, spec=inst.spec, num_samples=ev.num_samples,
                              batch_size=ev.batch_size, progress=False, generator=torch.Generator().manual_seed(1))
                gap[f"elbo_refined_{k}"] = rk.mean_and_se("elbo")[0]
                gap[f"refined_{k}_minus_encoder"] = paired(res.elbo, rk.elbo)
                gap[f"iwae_minus_refined_{k}"] = paired(rk.elbo, res.log_likelihood)
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": str(args.config), "settings": config.to_dict(), "strategies": rows, "amortization_gap": gap,
              "threads": torch.get_num_threads()}
    text = json.dumps(report, indent=1, default=str)
    atomic_write_bytes(out / "strategies.json", lambda f: f.write(text.encode()))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "strategies.csv", lambda f: f.write(buffer.getvalue().encode()))
    print(f"\n| strategy | θ steps | wall time (s) | test ELBO | test NLL (IWAE-{ev.num_samples}) | test λ |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['theta_steps']} | {r['wall_time_s']} "
              f"| {r['test_elbo']:.2f} ± {r['test_elbo_se']:.2f} "
              f"| {r['test_nll']:.2f} ± {r['test_nll_se']:.2f} | {r['test_lambda']} |")
    if gap:
        ks = args.gap_steps
        print(f"\namortization gap (amortized VAE, {gap['num_test']} test images, differences with paired s.e.):")
        print(f"  ELBO with enc(x) {gap['elbo_encoder']:.2f}; " + "; ".join(
            f"refined K={k} {gap[f'elbo_refined_{k}']:.2f} (+{gap[f'refined_{k}_minus_encoder'][0]:.2f} ± "
            f"{gap[f'refined_{k}_minus_encoder'][1]:.2f})" for k in ks)
            + f"; IWAE {gap['iwae']:.2f} (K={ks[-1]} → IWAE +{gap[f'iwae_minus_refined_{ks[-1]}'][0]:.2f} ± "
            f"{gap[f'iwae_minus_refined_{ks[-1]}'][1]:.2f})")
    plot(curves, rows, budget, out / "strategies.png")
    return report


def plot(curves, rows, budget, path):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, (seconds, elbos) in curves.items():
        if elbos:
            smooth = np.convolve(elbos, np.ones(min(10, len(elbos))) / min(10, len(elbos)), mode="valid")
            left.plot(seconds[len(seconds) - len(smooth):], smooth, label=key)
    left.set_xlabel("training wall time (s)")
    left.set_ylabel("train ELBO per datapoint (running mean)")
    left.set_title(f"same decoder initialisation, {budget} each")
    values = sorted(v for _, e in curves.values() for v in e)
    if values:
        left.set_ylim(values[len(values) // 10], values[-1] + 5)
        left.legend(fontsize=8)
    names = [r["strategy"] for r in rows]
    ypos = np.arange(len(rows))
    right.errorbar([-r["test_nll"] for r in rows], ypos + 0.1, xerr=[r["test_nll_se"] for r in rows], fmt="o",
                   label="IWAE bound")
    right.errorbar([r["test_elbo"] for r in rows], ypos - 0.1, xerr=[r["test_elbo_se"] for r in rows], fmt="s",
                   label="ELBO")
    right.set_yticks(ypos, names, fontsize=8)
    right.set_xlabel("test nats per image")
    right.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="experiment TOML (default: %(default)s)")
    parser.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key, e.g. -o train.inner_lr=0.3 (repeatable; read as TOML)")
    parser.add_argument("--strategies", nargs="+", default=list(ROWS)[:4], choices=list(ROWS),
                        help="rows of the table (default: the four of the lecture)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=float, default=None, help="training seconds per strategy (config: 180)")
    budget.add_argument("--max-steps", type=int, default=None,
                        help="θ steps per strategy instead of a wall-time budget (reproducible on any machine)")
    parser.add_argument("--num-test", type=int, default=None, help="first N test images (config: all 10,000)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="importance samples per test image (config: 1000)")
    parser.add_argument("--refine-steps", type=int, default=None,
                        help="Adam steps fitting test images' λ from the prior for svi-local, svi-inner (config: 300)")
    parser.add_argument("--gap-steps", type=int, nargs="*", default=[20, 100],
                        help="refinement steps K of the amortization gap (default: 20 100)")
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", default=None, help="output directory (default: the config's [output].run_dir)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


if __name__ == "__main__":
    sys.exit(report_errors(main)(build_parser().parse_args()))
