"""Attention as a latent variable on Multi30k: train the five variants of Deng et al. (2018) and compare them.

    python examples/attention_multi30k.py                          # all five, 20 min each (the config's budget)
    python examples/attention_multi30k.py --variants exact soft --max-steps 50
    python examples/attention_multi30k.py --variants hard variational --baseline learned   # Mnih & Gregor's
    python examples/attention_multi30k.py --config examples/configs/attention_synthetic.toml   # gold alignments
    python examples/attention_multi30k.py --table-only             # the table of runs already in --run-root

Each variant is one ``ppl-models fit`` experiment (``examples/configs/attention_multi30k.toml`` with
``model.variant`` set; the variant fixes its ELBO and guide) in ``<run-root>/<variant>``: checkpoints, metrics.json
(exact test perplexity, the variant's own objective, BLEU of greedy and beam-search translations, alignment accuracy
on data with gold alignments), alignments.png (prior p(z | x, y<t), posterior p(z | x, y) and q(z | x, y) side by
side) and translations.txt.  The table (markdown) goes to stdout and ``<run-root>/summary.md``.

The sampled variants (hard, variational) train with Deng et al.'s REINFORCE: the soft-attention baseline and the
closed-form KL (``--baseline learned``: a learned per-token baseline instead).  The five-variant table over two
seeds: ``python benchmarks/bench_alignment.py --table --seeds 0 1``.

Data: Multi30k from --data-dir, $PPL_MODELS_DATA, the cache, or a verified download.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from ppl_models.alignment import VARIANTS
from ppl_models.app.cli import report_errors
from ppl_models.app.experiment import Experiment
from ppl_models.atomic import atomic_write_bytes
from ppl_models.registry import UnknownNameError

CONFIG = Path(__file__).resolve().parent / "configs" / "attention_multi30k.toml"


def run_variant(args, variant: str) -> dict:
    overrides = {"model.variant": variant, "train.seed": args.seed, "train.progress": not args.no_progress}
    for flag, key in (("max_steps", "train.max_steps"), ("num_epochs", "train.num_epochs"),
                      ("time_limit", "train.time_limit"), ("data_dir", "data.data_dir"),
                      ("baseline", "model.baseline")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    for split in ("train", "test"):
        if getattr(args, f"limit_{split}") is not None:
            overrides[f"data.limit_{split}"] = getattr(args, f"limit_{split}")
    experiment = Experiment.from_file(args.config, overrides, run_dir=Path(args.run_root) / variant, resume=args.resume)
    result, metrics = experiment.fit(resume=args.resume)
    summary = metrics.to_metrics()
    summary["train_steps"] = result.step
    summary["train_wall_s"] = result.wall_time
    summary["epoch_time_s"] = result.history["epoch_time"][-1] if result.history.get("epoch_time") else None
    atomic_write_bytes(experiment.run_dir / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    return summary


def table(rows) -> str:
    """Markdown table of ``(variant, summary)`` rows."""
    lines = [
        "| variant | objective | test PPL (exact) | NLL/token | own objective/token | BLEU greedy "
        "| BLEU beam (first 100) | steps | train wall (s) | s/step | align acc. posterior / q |",
        "|" + "---|" * 11,
    ]
    for variant, m in rows:
        steps, wall = m.get("train_steps"), m.get("train_wall_s")
        acc = f"{m['align_accuracy_posterior']:.3f}" if "align_accuracy_posterior" in m else ""
        if "align_accuracy_guide" in m:
            acc += f" / {m['align_accuracy_guide']:.3f}"
        cells = [variant, VARIANTS[variant][0], f"{m['perplexity']:.2f}", f"{m['nll_per_token']:.4f}",
                 f"{m['elbo_per_token']:.4f}", f"{m.get('bleu_greedy', math.nan):.2f}",
                 f"{m.get('bleu_beam', math.nan):.2f}", str(steps or ""), f"{wall:.0f}" if wall else "",
                 f"{wall / steps:.2f}" if wall and steps else "", acc]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args):
    rows = []
    for variant in args.variants:
        if variant not in VARIANTS:
            raise UnknownNameError("variant", variant, VARIANTS)
        path = Path(args.run_root) / variant / "summary.json"
        if args.table_only:
            if path.is_file():
                rows.append((variant, json.loads(path.read_text())))
            continue
        rows.append((variant, run_variant(args, variant)))
    text = table(rows)
    print(text)
    if rows:
        atomic_write_bytes(Path(args.run_root) / "summary.md", lambda f: f.write((text + "\n").encode()))
    return dict(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="experiment TOML (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="default: all five")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the config's (none: time_limit)")
    parser.add_argument("--num-epochs", type=int, default=None, help="default: the config's (30; time_limit stops first)")
    parser.add_argument("--time-limit", type=float, default=None, help="training seconds per variant (config: 1500 CPU-seconds)")
    parser.add_argument("--baseline", default=None, choices=("soft", "learned"),
                        help="score-function baseline of hard and variational (config: soft)")
    parser.add_argument("--limit-train", type=int, default=None, help="use only the first N training pairs")
    parser.add_argument("--limit-test", type=int, default=None, help="evaluate only the first N test pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--run-root", default="runs/attention_multi30k", help="one run directory per variant below")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--table-only", action="store_true", help="only print the table of finished runs")
    parser.add_argument("--no-progress", action="store_true")
    sys.exit(report_errors(main)(parser.parse_args()))
