"""The five latent-alignment variants: training-step time relative to ``soft`` (default), or the perplexity table
of all five trained at one budget over several seeds (``--table``).

**The table** (``--table``): every variant of ``--variants`` (default all five, plus ``hard`` and ``variational``
with the learned baseline: ``--learned-baseline``) trained by ``ppl-models fit`` with ``--config``
(``examples/configs/attention_multi30k.toml``: one shared network with input feeding, Deng et al.'s REINFORCE,
validation by the exact log-likelihood, the learning rate halved on a plateau, early stopping, the same
``[train] time_limit`` for every variant) once per seed of ``--seeds``, each run in
``<run-root>/<variant>[-learned]-seed<k>``; a run whose ``summary.json`` exists is read, not trained again (so the
table can be built over several sessions; ``--table-only`` trains nothing).  Printed: test perplexity (exact) per
seed, the mean, steps (and the step of the best validation, whose parameters are evaluated), epochs and beam
BLEU, and the issue's checks on the means — exact ~ variational-enum <= variational
< soft < hard, variational within 5 % of variational-enum, hard within 10 % of soft — plus one JSON line.

    OMP_NUM_THREADS=1 python benchmarks/bench_alignment.py --table --seeds 0 1 --learned-baseline   # ~6 CPU-h

**Step time** (default):

Model: :mod:`ppl_models.alignment` with the Multi30k configuration (en->fr, vocabularies of the training set's
types seen at least twice, embeddings 64, GRUs 64, output embedding 64, batch 64 of similar lengths) — or, with
``--simulated``, random sentences of the same lengths over vocabularies of the same sizes.  Each variant is the engine's
``Trainer.train_step`` with the ELBO and guide the variant trains with (``ppl_models.alignment.VARIANTS``):

* ``soft``              ``Trace_ELBO``, no latent (the reference);
* ``exact``             ``TraceEnum_ELBO``, every z_t enumerated in the model;
* ``hard``              ``TraceGraph_ELBO``, z_t ~ prior, learned baseline;
* ``variational``       ``TraceGraph_ELBO``, z_t ~ q(z_t | x, y), learned baseline;
* ``variational-enum``  ``TraceEnum_ELBO``, q's z_t enumerated in the guide.

All variants start from the same weights of the shared network and consume the same batches (prepared before
timing).  Timing as in ``harness.py``: warm-up, then ``--rounds`` rounds of ``--steps`` steps per variant in rotated
order; medians over rounds and per-round paired ratios to ``soft``.  Goals: variational <= 1.5x soft,
exact <= 2x soft (time per step).  The last line printed is one JSON object.

    OMP_NUM_THREADS=1 python benchmarks/bench_alignment.py --threads 1
    python benchmarks/bench_alignment.py --quick --simulated
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import pyro
import torch

import ppl_models as pm
from harness import Impl, emit, measure, pyro_scope, run_info
from ppl_models.alignment import VARIANTS
from ppl_models.data.parallel import ParallelText, multi30k_splits
from ppl_models.data.text import Vocab
from ppl_models.infer import Trainer

REPO = Path(__file__).resolve().parents[1]
GOALS = {"variational": 1.5, "exact": 2.0}


def load_train(simulated: bool, num_data: int, seed: int, vocab_sizes=(5917, 6478)):
    data_dir = os.environ.get("PPL_MODELS_DATA") or str(REPO.parent / "shared" / "data")
    if not simulated:
        train = multi30k_splits("en", "fr", data_dir=data_dir, download=False)["train"]
        return train, f"multi30k en-fr from {data_dir}"
    gen = torch.Generator().manual_seed(seed)
    src_vocab, tgt_vocab = (Vocab([f"{p}{i}" for i in range(n)]) for p, n in zip("st", vocab_sizes))
    lengths = torch.randint(5, 31, (num_data, 2), generator=gen)
    src = [torch.randint(4, len(src_vocab), (int(n),), generator=gen).tolist() for n in lengths[:, 0]]
    tgt = [torch.randint(4, len(tgt_vocab), (int(n),), generator=gen).tolist() for n in lengths[:, 1]]
    return ParallelText(src, tgt, src_vocab, tgt_vocab), "simulated (random tokens, Multi30k vocabulary sizes)"


def main(args) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.num_data = 2, 1, 1, min(args.num_data, 256)
        args.emb_dim, args.hidden_dim, args.out_dim = 16, 32, 16
    warmup = args.warmup if args.warmup is not None else max(2, args.steps // 2)
    train, source = load_train(args.simulated, args.num_data, args.seed, (300, 300) if args.quick else (5917, 6478))
    gen = torch.Generator().manual_seed(args.seed + 1)
    order = train.epoch_order(args.batch_size, gen)
    batches = []
    for b in range(min(args.steps, 50)):
        idx = order[b * args.batch_size : (b + 1) * args.batch_size]
        batches.append((train.batch(idx), idx))
    sizes = dict(train.model_kwargs, emb_dim=args.emb_dim, hidden_dim=args.hidden_dim, out_dim=args.out_dim,
                 input_feed=args.input_feed, baseline=args.baseline)
    pyro.set_rng_seed(args.seed)
    base = pm.instantiate("alignment", "none", num_data=train.num_data, model_kwargs=dict(sizes, variant="soft"))
    impls, trainers = [], {}
    for variant, (elbo, guide) in VARIANTS.items():
        pyro.set_rng_seed(args.seed)
        inst = pm.instantiate("alignment", guide, num_data=train.num_data, model_kwargs=dict(sizes, variant=variant))
        inst.modules["net"].load_state_dict(base.modules["net"].state_dict())
        trainer = Trainer(inst.model, inst.guide, train, elbo=elbo, lr=args.lr, batch_size=args.batch_size,
                          progress=False, seed=args.seed, fast_path=False)  # Pyro's step for every variant
        trainers[variant] = trainer
        impls.append(Impl(variant, f"{variant} ({elbo}, guide {guide})",
                          lambda batch, t=trainer: t.train_step(*batch), pyro_scope(None)))
    rates = measure(impls, batches, args.rounds, args.steps, warmup)
    steps_per_s = {k: statistics.median(v) for k, v in rates.items()}
    # time per step relative to soft: soft's rate over the variant's rate, paired within each round
    time_ratio = {k: statistics.median(s / r for s, r in zip(rates["soft"], v)) for k, v in rates.items()}
    mean_tokens = statistics.mean(float(b[0][3].sum()) / len(b[1]) for b in batches)
    print("latent-alignment training step, time per step relative to soft (same run, paired per round)")
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds"
          " "
          f"x {args.steps} steps (+{warmup} warm-up); data: {source}; batch {args.batch_size}, "
          f"{mean_tokens:.1f} target tokens per sentence; vocab {sizes['src_vocab_size']}/{sizes['tgt_vocab_size']}, "
          f"emb {args.emb_dim}, hidden {args.hidden_dim}, output embedding {args.out_dim}")
    head = f"{'variant':<60} {'steps/s':>8} {'ms/step':>8} {'time/soft':>10} {'goal':>6}"
    print(head)
    print("-" * len(head))
    for impl in impls:
        goal = GOALS.get(impl.name)
        print(f"{impl.label:<60} {steps_per_s[impl.name]:8.2f} {1000 / steps_per_s[impl.name]:8.1f} "
              f"{time_ratio[impl.name]:10.2f} {('<= ' + str(goal)) if goal else '':>6}")
    result = {
        "benchmark": "alignment_step",
        "steps_per_s": steps_per_s,
        "time_ratio_vs_soft": time_ratio,
        "goal": GOALS,
        "goal_met": {k: time_ratio[k] <= g for k, g in GOALS.items()},
        **run_info(args, warmup),
        "num_data": train.num_data,
        "data": "simulated" if args.simulated else "multi30k",
        "emb_dim": args.emb_dim,
        "hidden_dim": args.hidden_dim,
        "out_dim": args.out_dim,
        "input_feed": args.input_feed,
        "baseline": args.baseline,
    }
    return emit(result)


# ------------------------------------------------------------------------------------------------------- the table
def _run_name(variant: str, baseline: str, seed: int) -> str:
    return f"{variant}{'-learned' if baseline == 'learned' else ''}-seed{seed}"


def train_run(config: str, variant: str, baseline: str, seed: int, run_dir: Path, progress: bool) -> dict:
    """One ``ppl-models fit`` of ``config`` with ``model.variant``/``model.baseline``/``train.seed`` set; its
    metrics and training numbers, written to ``run_dir/summary.json``."""
    from ppl_models.app.experiment import Experiment
    from ppl_models.atomic import atomic_write_bytes

    overrides = {"model.variant": variant, "model.baseline": baseline, "train.seed": seed,
                 "train.progress": progress}
    experiment = Experiment.from_file(config, overrides, run_dir=run_dir)
    result, metrics = experiment.fit()
    summary = dict(metrics.to_metrics(), train_steps=result.step, train_epochs=result.epoch,
                   train_seconds=result.train_seconds, best_step=result.best_step, baseline=baseline, seed=seed)
    atomic_write_bytes(run_dir / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    return summary


def table(args) -> dict:
    """The five-variant perplexity table (module docstring)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = [(v, "soft") for v in args.variants]
    if args.learned_baseline:
        rows += [(v, "learned") for v in ("hard", "variational") if v in args.variants]
    results = {}
    for variant, baseline in rows:
        if variant not in VARIANTS:
            raise SystemExit(f"error: unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
        for seed in args.seeds:
            run_dir = Path(args.run_root) / _run_name(variant, baseline, seed)
            path = run_dir / "summary.json"
            if path.is_file():
                results[(variant, baseline, seed)] = summary = json.loads(path.read_text())
                if "best_step" not in summary and (run_dir / "train.json").is_file():
                    summary["best_step"] = json.loads((run_dir / "train.json").read_text()).get("best_step")
            elif not args.table_only:
                results[(variant, baseline, seed)] = train_run(args.config, variant, baseline, seed, run_dir,
                                                               not args.no_progress)
    ppl = {}
    print(f"test perplexity (exact), {args.config}, seeds {args.seeds}; runs in {args.run_root}")
    print("| variant | baseline | " + " | ".join(f"PPL seed {s}" for s in args.seeds)
          + " | PPL mean | steps (best) | epochs | BLEU beam |")
    print("|---|---|" + "---|" * (len(args.seeds) + 4))
    for variant, baseline in rows:
        found = [results.get((variant, baseline, s)) for s in args.seeds]
        values = [m["perplexity"] for m in found if m]
        if values:
            ppl[(variant, baseline)] = statistics.mean(values)
        cells = [f"{m['perplexity']:.2f}" if m else "" for m in found]
        steps = " / ".join(f"{m['train_steps']} ({m.get('best_step') or '-'})" for m in found if m)
        epochs = " / ".join(str(m["train_epochs"]) for m in found if m)
        bleu = " / ".join(f"{m['bleu_beam']:.1f}" for m in found if m and "bleu_beam" in m)
        shown = "learned" if baseline == "learned" else ("soft" if variant in ("hard", "variational") else "")
        mean = f"{ppl[(variant, baseline)]:.2f}" if values else ""
        print(f"| {variant} | {shown} | " + " | ".join(cells) + f" | {mean} | {steps} | {epochs} | {bleu} |")
    m = {v: ppl.get((v, "soft"), math.nan) for v in VARIANTS}
    checks = {
        "exact ~ variational-enum (within 5 %)": abs(m["exact"] / m["variational-enum"] - 1) <= 0.05,
        "variational-enum <= variational": m["variational-enum"] <= m["variational"],
        "variational within 5 % of variational-enum": m["variational"] <= 1.05 * m["variational-enum"],
        "variational < soft": m["variational"] < m["soft"],
        "soft < hard": m["soft"] < m["hard"],
        "hard within 10 % of soft": m["hard"] <= 1.10 * m["soft"],
    }
    for name, ok in checks.items():
        print(f"{'met' if ok else 'NOT met':>8}  {name}")
    return emit({"benchmark": "alignment_table", "config": args.config, "seeds": args.seeds,
                 "perplexity": {f"{v}/{b}": x for (v, b), x in ppl.items()}, "checks": checks,
                 "runs": {_run_name(v, b, s): r.get("perplexity") for (v, b, s), r in results.items()}})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default steps // 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--emb-dim", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=64)
    p.add_argument("--out-dim", type=int, default=64)
    p.add_argument("--num-data", type=int, default=29000, help="sentences (--simulated only)")
    p.add_argument("--simulated", action="store_true", help="random sentences instead of Multi30k")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke test (2 rounds x 1 step, small network; with --simulated, vocabularies of 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--input-feed", action="store_true", help="step time: the model with input feeding")
    p.add_argument("--baseline", default="soft", choices=("soft", "learned"),
                   help="step time: the score-function baseline of hard and variational (default: %(default)s)")
    t = p.add_argument_group("the perplexity table (--table)")
    t.add_argument("--table", action="store_true", help="train the variants at the config's budget and tabulate")
    t.add_argument("--config", default=str(REPO / "examples" / "configs" / "attention_multi30k.toml"))
    t.add_argument("--variants", nargs="+", default=list(VARIANTS), help="default: all five")
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    t.add_argument("--learned-baseline", action="store_true",
                   help="also hard and variational with the learned baseline")
    t.add_argument("--run-root", default="runs/attention_table", help="one run directory per variant and seed")
    t.add_argument("--table-only", action="store_true", help="only tabulate the runs already finished")
    t.add_argument("--no-progress", action="store_true")
    parsed = p.parse_args()
    table(parsed) if parsed.table else main(parsed)
