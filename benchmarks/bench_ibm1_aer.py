"""Alignment error rate of the package's IBM Model 1 (or, ``--model hmm``, its HMM alignment model) on the Hansards
trial set (37 pairs, Och & Ney's gold).

Training text (unsupervised, as the HLT-NAACL 2003 shared task's systems): Multi30k en-fr training pairs
(``train.lc.norm.tok``, 29,000) + the Hansards test text (447 pairs, no links) + the trial text (37 pairs), all
lowercased.  Both directions: ``en->fr`` (English source, one link per French word) and ``fr->en``; each IBM Model 1
with NULL, uniform start, ``--iterations`` EM iterations (:func:`ppl_models.infer.em.fit_em`), Viterbi links
(NULL = unaligned).  Symmetrized: intersection, union, grow-diag-final.  Scored against the trial gold (English
position first; sure/possible): AER, precision, recall (:mod:`ppl_models.tasks.aer`).

Goals (issue 19, what a standard implementation scores here): AER en->fr <= 0.49, fr->en <= 0.47,
intersection <= 0.33 (IBM Model 1).  ``--model hmm``: the HMM (Vogel et al. 1996, NULL as Och & Ney 2003) started
by ``--ibm1-iterations`` of IBM Model 1, then ``--iterations`` HMM iterations; links from its posterior marginals.
Prints a table; the last line is one JSON object.

    OMP_NUM_THREADS=1 PPL_MODELS_DATA=../shared/data python benchmarks/bench_ibm1_aer.py
    python benchmarks/bench_ibm1_aer.py --multi30k-pairs 2000 --iterations 5   # a quick look (not the goal)
    OMP_NUM_THREADS=1 PPL_MODELS_DATA=../shared/data python benchmarks/bench_ibm1_aer.py --model hmm --iterations 5
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ppl_models.data.files import fetch
from ppl_models.data.hansards import hansards_gold_path, hansards_text
from ppl_models.data.text import read_parallel
from ppl_models.tasks import aer, hmm_align, ibm1

REPO = Path(__file__).resolve().parents[1]
GOALS = {"en->fr": 0.49, "fr->en": 0.47, "intersection": 0.33}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("ibm1", "hmm"), default="ibm1")
    ap.add_argument("--iterations", type=int, default=10, help="EM iterations per direction (default 10)")
    ap.add_argument("--ibm1-iterations", type=int, default=5, help="hmm: IBM Model 1 iterations first (default 5)")
    ap.add_argument("--null-prob", type=float, default=0.2, help="hmm: p0 (default 0.2)")
    ap.add_argument("--max-jump", type=int, default=7, help="hmm: D, the widest jump of its own (default 7)")
    ap.add_argument("--multi30k-pairs", type=int, default=None, help="use only the first N Multi30k pairs")
    ap.add_argument("--threshold", type=float, default=None,
                    help="also score posterior-threshold links at this threshold")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = os.environ.get("PPL_MODELS_DATA") or str(REPO.parent / "shared" / "data")

    t0 = time.perf_counter()
    m_en, m_fr = read_parallel(*(fetch("multi30k", f"train.lc.norm.tok.{lang}", data_dir=data_dir, download=False)
                                 for lang in ("en", "fr")), lower=True)
    if args.multi30k_pairs is not None:
        m_en, m_fr = m_en[: args.multi30k_pairs], m_fr[: args.multi30k_pairs]
    test_en, test_fr = hansards_text("test", data_dir=data_dir)
    trial_en, trial_fr = hansards_text("trial", data_dir=data_dir)
    gold = aer.read_gold(hansards_gold_path(data_dir=data_dir), num_sentences=len(trial_en))
    english, french = m_en + test_en + trial_en, m_fr + test_fr + trial_fr
    t_load = time.perf_counter() - t0

    times, fits = {}, {}
    for name, (src, tgt) in (("en->fr", (english, french)), ("fr->en", (french, english))):
        t0 = time.perf_counter()
        if args.model == "hmm":
            fits[name] = hmm_align.fit_hmm(src, tgt, num_iterations=args.iterations,
                                           ibm1_iterations=args.ibm1_iterations, null_prob=args.null_prob,
                                           max_jump=args.max_jump)
        else:
            fits[name] = ibm1.fit_ibm1(src, tgt, num_iterations=args.iterations)
        times[name] = time.perf_counter() - t0

    t0 = time.perf_counter()
    post_ef = fits["en->fr"].posteriors(trial_en, trial_fr)
    post_fe = fits["fr->en"].posteriors(trial_fr, trial_en)
    lengths = ibm1.sentence_lengths(trial_en, trial_fr)
    rows = {}

    def add_rows(suffix, fwd, bwd):
        rows["en->fr" + suffix] = fwd
        rows["fr->en" + suffix] = bwd
        for method in aer.SYMMETRIZATIONS:
            rows[method + suffix] = aer.symmetrize(fwd, bwd, method, lengths)

    add_rows("", ibm1.viterbi_links(post_ef), [aer.transpose(s) for s in ibm1.viterbi_links(post_fe)])
    if args.threshold is not None:
        add_rows(f" (p>{args.threshold})", ibm1.threshold_links(post_ef, args.threshold),
                 [aer.transpose(s) for s in ibm1.threshold_links(post_fe, args.threshold)])
    scores = {name: aer.score(links, gold) for name, links in rows.items()}
    t_align = time.perf_counter() - t0

    what = ("IBM Model 1 (NULL" if args.model == "ibm1" else
            f"HMM (p0 {args.null_prob}, D {args.max_jump}, {args.ibm1_iterations} IBM Model 1 iterations first")
    print(f"{what}, {args.iterations} EM iterations, posterior-argmax links) on {len(english)} pairs "
          f"(Multi30k {len(m_en)} + Hansards test {len(test_en)} + trial {len(trial_en)}); "
          f"gold: {sum(len(g.sure) for g in gold)} sure, {sum(len(g.possible) for g in gold)} possible links")
    print(f"{'links':<28} {'AER':>6} {'prec':>6} {'recall':>6} {'|A|':>5}  goal")
    for name, s in scores.items():
        goal = GOALS.get(name) if args.model == "ibm1" else None
        mark = "" if goal is None else f"<= {goal:.2f} {'met' if s.aer <= goal else 'NOT met'}"
        print(f"{name:<28} {s.aer:6.3f} {s.precision:6.3f} {s.recall:6.3f} {s.num_predicted:5d}  {mark}")
    for name, fit in fits.items():
        ll = fit.em.log_likelihood
        print(f"{name}: {fit.params.num_entries} table entries (src vocab {len(fit.src_vocab)}, tgt vocab "
              f"{len(fit.tgt_vocab)}), mean log-lik/pair {ll[0]:.2f} -> {ll[-1]:.2f}, fit {times[name]:.1f} s")
    print(f"load {t_load:.1f} s, align + score {t_align:.2f} s, threads {torch.get_num_threads()}")
    result = {
        "benchmark": "ibm1_aer" if args.model == "ibm1" else "hmm_aer",
        "aer": {name: round(s.aer, 4) for name, s in scores.items()},
        "scores": {name: s.as_dict() for name, s in scores.items()},
        "goal": GOALS,
        "goal_met": all(scores[name].aer <= goal for name, goal in GOALS.items()) if args.model == "ibm1" else None,
        "iterations": args.iterations,
        "num_pairs": len(english),
        "fit_s": {name: round(t, 2) for name, t in times.items()},
        "load_s": round(t_load, 2),
        "align_s": round(t_align, 3),
        "log_likelihood": {name: fit.em.log_likelihood for name, fit in fits.items()},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
