"""From "inference as optimization" to "inference as prediction", on MNIST with one decoder.

Trains the VAE's decoder with each inference strategy of the lecture on the same wall-time budget,
then evaluates every one the same way on test images:

* ``svi-local``      joint SVI over θ and a stored λ_i per training image (test images: λ fitted by K steps);
* ``svi-inner``      per minibatch, K gradient steps on a fresh λ with θ fixed, then one θ step;
* ``amortized``      λ = enc_φ(x) (the VAE);
* ``semi-amortized`` λ0 = enc_φ(x), refined by K steps (Kim et al. 2018).

For the amortized model it also reports the amortization gap: the test ELBO with the encoder's λ, after
refining λ for 20 and 100 steps, and the IWAE log-likelihood.

    python examples/inference_strategies.py                                   # 3 minutes per strategy
    python examples/inference_strategies.py --budget 5 --num-test 16 --num-samples 8 --limit-train 512   # smoke test

Writes ``strategies.json``, ``strategies.csv`` and ``strategies.png`` to --out.
"""

import argparse
import csv
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

import ppl_models as pm  # noqa: E402
from ppl_models.atomic import atomic_write_bytes  # noqa: E402
from ppl_models.data import mnist_splits  # noqa: E402
from ppl_models.evaluate import evaluate  # noqa: E402
from ppl_models.experiment import Head  # noqa: E402
from ppl_models.infer import Trainer  # noqa: E402
from ppl_models.infer.strategies import STRATEGIES, RefiningGuide, guide_for_strategy, make_strategy  # noqa: E402


def build(strategy, args, num_data):
    """A fresh model (the same decoder initialisation for every strategy) and the strategy's guide."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model_kwargs = {"z_dim": args.z_dim, "hidden_dims": args.hidden_dims}
    guide_name = guide_for_strategy(strategy)
    guide_kwargs = {} if guide_name in (None, "mean-field") else {"hidden_dims": args.hidden_dims}
    inst = pm.instantiate("vae", guide_name, num_data=num_data, model_kwargs=model_kwargs, guide_kwargs=guide_kwargs)
    guide, step = make_strategy(strategy, inst.model, inst.guide, inst.spec, dict(inst.modules),
                                num_steps=args.inner_steps, lr=args.inner_lr, refine_grad=args.refine_grad,
                                optimizer=args.inner_optimizer)
    return inst, guide, step


def test_guide(strategy, inst, guide, num_steps, args):
    """How each strategy infers λ for test images it never saw: by its own refinement, or its encoder."""
    if strategy in ("amortized",):
        return guide
    encoder = inst.modules["encoder"] if strategy == "semi-amortized" else None
    return RefiningGuide(inst.model, inst.spec, num_steps=num_steps, lr=args.inner_lr, encoder=encoder,
                         optimizer=args.inner_optimizer)


def score(inst, guide, test, args, seed):
    result = evaluate(inst.model, guide, test, spec=inst.spec, num_samples=args.num_samples,
                      batch_size=args.eval_batch_size, progress=False, generator=torch.Generator().manual_seed(seed))
    return result.mean_and_se("elbo"), result.mean_and_se("log_likelihood")


def main(args):
    splits = mnist_splits("dynamic", data_dir=args.data_dir)
    train = Head(splits["train"], args.limit_train) if args.limit_train else splits["train"]
    test = Head(splits["test"], args.num_test)
    rows, curves, gap = [], {}, None
    for strategy in args.strategies:
        inst, guide, step = build(strategy, args, train.num_data)
        trainer = Trainer(inst.model, guide, train, step_fn=step, elbo="Trace_ELBO", lr=args.lr,
                          batch_size=args.batch_size, num_epochs=10**6, time_limit=args.budget, seed=args.seed,
                          progress=not args.no_progress, log_every=10)
        start = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - start
        eval_steps = args.inner_steps if strategy != "svi-local" else args.test_steps
        (elbo, elbo_se), (ll, ll_se) = score(inst, test_guide(strategy, inst, guide, eval_steps, args), test, args, 1)
        rows.append({"strategy": strategy, "steps": result.step, "epochs": round(result.step / trainer.num_batches, 2),
                     "wall_time_s": round(wall, 1), "test_elbo": elbo, "test_elbo_se": elbo_se,
                     "test_nll": -ll, "test_nll_se": ll_se, "eval_refine_steps": 0 if strategy == "amortized" else eval_steps})
        curves[strategy] = (result.history["log_step"], result.history["log_train_elbo"])
        print(f"{strategy:15s} {result.step:6d} steps {wall:6.1f} s  test ELBO {elbo:8.2f} ± {elbo_se:.2f}  "
              f"test NLL {-ll:8.2f} ± {ll_se:.2f}", flush=True)
        if strategy == "amortized":
            gap = {"elbo_encoder": elbo, "iwae": ll}
            for k in (20, 100):
                refined = RefiningGuide(inst.model, inst.spec, num_steps=k, lr=args.inner_lr,
                                        encoder=inst.modules["encoder"], optimizer=args.inner_optimizer)
                (gap[f"elbo_refined_{k}"], _), _ = score(inst, refined, test, args, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": vars(args), "strategies": rows, "amortization_gap": gap}
    text = json.dumps(report, indent=1, default=str)
    atomic_write_bytes(out / "strategies.json", lambda f: f.write(text.encode()))
    with open(out / "strategies.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n| strategy | steps | wall time (s) | test ELBO | test NLL (IWAE-%d) |" % args.num_samples)
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['steps']} | {r['wall_time_s']} | {r['test_elbo']:.2f} ± {r['test_elbo_se']:.2f} "
              f"| {r['test_nll']:.2f} ± {r['test_nll_se']:.2f} |")
    if gap:
        print(f"\namortization gap (amortized VAE, {args.num_test} test images): ELBO with enc(x) {gap['elbo_encoder']:.2f}, "
              f"refined K=20 {gap['elbo_refined_20']:.2f}, K=100 {gap['elbo_refined_100']:.2f}, IWAE {gap['iwae']:.2f}; "
              f"gaps: enc→K=100 {gap['elbo_refined_100'] - gap['elbo_encoder']:.2f}, "
              f"K=100→IWAE {gap['iwae'] - gap['elbo_refined_100']:.2f} nats")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for strategy, (steps, elbos) in curves.items():
        ax.plot(steps, elbos, label=strategy)
    ax.set_xlabel("step")
    ax.set_ylabel("train ELBO per datapoint")
    ax.set_title(f"same decoder, {args.budget:g} s per strategy")
    values = [v for _, e in curves.values() for v in e]
    if values:
        ax.set_ylim(sorted(values)[len(values) // 20], max(values) + 2)
    ax.legend()
    fig.savefig(out / "strategies.png", dpi=110, bbox_inches="tight")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--budget", type=float, default=180.0, help="training seconds per strategy")
    parser.add_argument("--z-dim", type=int, default=20)
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[400])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--inner-steps", type=int, default=10, help="K for svi-inner and semi-amortized")
    parser.add_argument("--inner-lr", type=float, default=0.05)
    parser.add_argument("--inner-optimizer", default="adam", choices=["sgd", "adam"],
                        help="refinement steps on λ: Adam (default) or the lecture's plain gradient steps")
    parser.add_argument("--refine-grad", default="stop", choices=["stop", "end-to-end"])
    parser.add_argument("--test-steps", type=int, default=100, help="K fitting λ of test images for svi-local")
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=1000, help="importance samples per test image")
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/inference_strategies")
    parser.add_argument("--no-progress", action="store_true")
    main(parser.parse_args())
