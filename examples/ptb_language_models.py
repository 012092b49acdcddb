"""Sentence models on Penn Treebank: bigram and LSTM language models, the text VAE (with and without KL annealing
and word dropout) and the variational RNN; test NLL, KL, perplexity and wall time.

    python examples/ptb_language_models.py --config examples/configs/ptb_lstm_lm.toml
    python examples/ptb_language_models.py --config examples/configs/ptb_text_vae_tricks.toml -o train.time_limit=60
    python examples/ptb_language_models.py --table runs/ptb/*        # the results table of finished runs

One run per config (``examples/configs/ptb_*.toml``).  The script is config-driven rather than going through
``ppl-models fit``: the KL weight and the word-dropout keep rate change per training step, ragged batches of a
10k-word softmax must be scored with an explicit sample chunk size, and the outputs (perplexity over tokens,
decoded sentences) are not the image experiment's plots and metrics.  It reuses the engine
(:class:`~ppl_models.infer.annealing.AnnealedTrainer`, a :class:`~ppl_models.infer.engine.Trainer`: length-bucketed
epochs through :meth:`~ppl_models.data.ptb.SentenceDataset.epoch_order`, ``max_steps``/``time_limit``, non-finite
checks, atomic checkpoints, ``--resume``), the registry and the importance-sampling evaluator.

Evaluation: every model is scored on the same random subset of ``evaluate.test_subset`` test sentences (seed
``evaluate.subset_seed``; 0 = the whole test set), by the evaluator's importance-sampled log-likelihood
(IWAE with ``evaluate.num_samples`` draws for latent-variable models, exact with one draw for the LMs); latent
models also on ``evaluate.big_k_sentences`` of them with ``evaluate.big_num_samples`` (the issue's K = 500) to show
how far the smaller K is from converged.  Perplexity ``exp(-sum log p / tokens)`` counts ``<eos>``; for a latent
model it is an upper bound (from the IWAE lower bound on log p).  Writes ``<run_dir>/results.json`` (atomically)
and checkpoints; prints samples from the prior and interpolations for the text VAE.

Config keys (unknown ones are an error naming the key): a top-level ``label``; ``[model]`` and ``[guide]``
(``name`` plus the build functions' hyperparameters); ``[data]``, ``[train]``, ``[evaluate]``, ``[output]`` as in
:data:`SCHEMA`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine

from ppl_models import registry
from ppl_models.app.cli import report_errors
from ppl_models.atomic import atomic_write_bytes
from ppl_models.app.config import ConfigError, parse_override, read_toml
from ppl_models.data.ptb import SentenceDataset, ptb_splits
from ppl_models.infer.evaluate import evaluate
from ppl_models.infer.annealing import AnnealedTrainer, KLSchedule
from ppl_models.infer.engine import Trainer
from ppl_models.registry import UnknownNameError

CONFIGS = Path(__file__).resolve().parent / "configs"

#: section -> key -> default (the type of the default is the key's type; None: optional int)
SCHEMA = {
    "data": {"data_dir": "", "max_len": 100, "limit_train": 0},
    "train": {
        "elbo": "Trace_ELBO", "lr": 1e-3, "batch_size": 64, "num_epochs": 1, "max_steps": 0, "time_limit": 0.0,
        "seed": 0,
        "kl_schedule": "constant", "warmup_steps": 1000, "rate": 0.0025, "midpoint": 2500.0, "word_keep": 1.0,
        "log_every": 25,
    },
    "evaluate": {
        "num_samples": 10, "batch_size": 16, "chunk_size": 4, "test_subset": 500, "subset_seed": 0,
        "big_num_samples": 500, "big_k_sentences": 10, "num_prior_samples": 5, "interpolation_steps": 5,
        "full_test": True,
    },
    "output": {"run_dir": "runs/ptb/run"},
}
_SECTIONS = ("label", "model", "guide", *SCHEMA)


# ------------------------------------------------------------------------------------------------ config
def load_run_config(path, overrides=()) -> dict:
    """The TOML run config with ``SECTION.KEY=VALUE`` overrides (``-o``/``--set``, read by the command line's
    :func:`~ppl_models.app.config.parse_override`), checked against :data:`SCHEMA`."""
    path = Path(path)
    raw = read_toml(path)
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if not name or section not in _SECTIONS or section == "label":
            raise ConfigError(f"override {text!r}: expected SECTION.KEY=VALUE with SECTION one of {_SECTIONS[1:]}")
        raw.setdefault(section, {})[name] = value
    config = {"label": raw.pop("label", path.stem)}
    unknown = [k for k in raw if k not in _SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: {UnknownNameError('section', unknown[0], _SECTIONS)}")
    for section in ("model", "guide"):
        table = dict(raw.get(section, {}))
        if section == "model" and "name" not in table:
            raise ConfigError(f"{path}: [model].name is required (one of {registry.model_names()})")
        config[section] = table
    for section, defaults in SCHEMA.items():
        table = dict(raw.get(section, {}))
        for key, value in table.items():
            if key not in defaults:
                raise ConfigError(f"{path}: [{section}] {UnknownNameError('key', key, defaults)}")
            default = defaults[key]
            ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                raise ConfigError(
                    f"{path}: [{section}].{key}: expected {type(default).__name__}, "
                    f"received {type(value).__name__} {value!r}"
                )
            table[key] = value
        config[section] = {**defaults, **table}
    return config


# ------------------------------------------------------------------------------------------------ helpers
def _log(msg: str) -> None:
    print(msg, flush=True)


@torch.no_grad()
def batch_kl(model, guide, tokens, lengths) -> float:
    """Monte Carlo KL(q || p) per sentence on one batch (one draw, beta = 1): sum over latent sites of
    log q - log p, averaged over the batch."""
    guide_trace = poutine.trace(guide).get_trace(tokens, lengths, None)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(tokens, lengths, None)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    total = 0.0
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and name in model_trace.nodes and "log_prob" in site:
            total += float(site["log_prob"].sum() - model_trace.nodes[name]["log_prob"].sum())
    return total / tokens.shape[0]


def train_neural(instance, train: SentenceDataset, probe: SentenceDataset, cfg: dict, run_dir: Path,
                 resume: bool) -> dict:
    """Minibatch SVI with the engine (length-bucketed epochs through ``SentenceDataset.epoch_order``) until
    ``num_epochs``, ``max_steps`` or ``time_limit``; every ``log_every`` steps logs the KL weight, the running
    -ELBO_beta per token and the KL per sentence on the ``probe`` sentences (a fixed validation batch)."""
    t = cfg["train"]
    common = dict(elbo=t["elbo"], lr=t["lr"], batch_size=t["batch_size"], num_epochs=t["num_epochs"],
                  max_steps=t["max_steps"] or None, time_limit=t["time_limit"] or None, seed=t["seed"],
                  run_dir=run_dir, progress=False, log_every=t["log_every"])
    latent = has_latents(instance)
    if latent:
        schedule = KLSchedule(t["kl_schedule"], t["warmup_steps"], t["rate"], t["midpoint"])
        trainer = AnnealedTrainer(instance.model, instance.guide, train, kl_schedule=schedule,
                                  word_keep=t["word_keep"], **common)
    else:
        if t["kl_schedule"] != "constant" or t["word_keep"] != 1.0:
            raise ConfigError(f"model {instance.model_name!r} has no latent variable: KL annealing and word "
                              "dropout do not apply (remove [train] kl_schedule / word_keep)")
        trainer = Trainer(instance.model, instance.guide, train, **common)
    probe_args = probe.batch(torch.arange(probe.num_data))
    mean_length = train.num_tokens / train.num_data
    log = []
    start = time.perf_counter()

    def callback(trainer, step, loss):
        if step % t["log_every"]:
            return
        # the engine's running mean of -ELBO_beta per sentence over the last log_every steps
        logged = trainer.history["log_train_elbo"]
        per_token = -logged[-1] / mean_length if logged else math.nan
        with torch.random.fork_rng(devices=[]):
            kl = batch_kl(instance.model, instance.guide, *probe_args) if latent else 0.0
        entry = {"step": step, "kl_weight": trainer.kl_weight if latent else 1.0,
                 "train_loss_per_token": per_token, "probe_kl": kl, "seconds": time.perf_counter() - start}
        log.append(entry)
        _log(f"step {step:6d}  beta {entry['kl_weight']:.3f}  -ELBO_beta/token {per_token:.3f}  "
             f"KL on {probe.num_data} valid sentences {kl:.2f}  ({entry['seconds']:.0f} s)")

    trainer.callback = callback
    result = trainer.fit(resume=resume)
    if trainer.max_steps is not None and trainer.step >= trainer.max_steps:
        stopped = f"max_steps {trainer.max_steps}"
    elif trainer.epoch >= trainer.num_epochs:
        stopped = f"num_epochs {trainer.num_epochs}"
    else:
        stopped = f"time limit {t['time_limit']:.0f} s"
    _log(f"training stopped by {stopped} at step {trainer.step} ({result.wall_time:.0f} s)")
    return {"steps": trainer.step, "stopped_by": stopped,
            "epochs": trainer.epoch + trainer.batch_in_epoch / trainer.num_batches,
            "train_seconds": result.wall_time, "log": log}


def has_latents(instance) -> bool:
    return instance.model_name not in ("bigram", "lstm-lm")


@torch.no_grad()
def exact_log_likelihood(model, data: SentenceDataset, batch_size: int):
    """Per-sentence log p(x) of a model without latent variables: the observed site's masked log-density."""
    out = torch.empty(data.num_data, dtype=torch.float64)
    for start in range(0, data.num_data, batch_size):
        idx = torch.arange(start, min(start + batch_size, data.num_data))
        tokens, lengths = data.batch(idx)
        site = poutine.trace(model).get_trace(tokens, lengths, None).nodes["x"]
        out[idx] = site["fn"].log_prob(site["value"]).double()
    return out


def random_subset(data: SentenceDataset, n: int, seed: int) -> SentenceDataset:
    """``n`` sentences drawn without replacement (seeded), ordered by length; ``n = 0`` or ``>= N``: all."""
    if n <= 0 or n >= data.num_data:
        return data
    rows = torch.randperm(data.num_data, generator=torch.Generator().manual_seed(seed))[:n]
    return SentenceDataset([data.sequences[int(i)] for i in rows], data.vocab).sorted_by_length()


def score(instance, data: SentenceDataset, num_samples: int, ev: dict, seed: int) -> dict:
    """Importance-sampled evaluation summarized: NLL per sentence, KL, perplexity (bound), wall time.  A model
    without latents is scored exactly (``num_samples`` is then ignored)."""
    tokens = data.num_tokens
    if not has_latents(instance):
        t0 = time.perf_counter()
        ll = exact_log_likelihood(instance.model, data, ev["batch_size"])
        se = float(ll.std() / math.sqrt(len(ll))) if len(ll) > 1 else float("nan")
        return {"num_sentences": data.num_data, "num_tokens": tokens, "num_samples": 1, "nll": -float(ll.mean()),
                "nll_se": se, "elbo": float(ll.mean()), "kl": 0.0, "ppl": math.exp(-float(ll.sum()) / tokens),
                "ppl_elbo": math.exp(-float(ll.sum()) / tokens), "pareto_khat_frac_bad": None,
                "eval_seconds": time.perf_counter() - t0}
    result = evaluate(
        instance.model, instance.guide, data, spec=instance.spec, num_samples=num_samples,
        batch_size=ev["batch_size"], chunk_size=ev["chunk_size"], generator=torch.Generator().manual_seed(seed),
        progress=False,
    )
    ll, se = result.mean_and_se("log_likelihood")
    return {
        "num_sentences": data.num_data, "num_tokens": tokens, "num_samples": num_samples,
        "nll": -ll, "nll_se": se, "elbo": float(result.elbo.mean()), "kl": float(result.kl.mean()),
        "ppl": math.exp(-float(result.log_likelihood.sum()) / tokens),
        "ppl_elbo": math.exp(-float(result.elbo.sum()) / tokens),
        "pareto_khat_frac_bad": result.to_metrics()["pareto_khat_frac_bad"],
        "eval_seconds": result.wall_time_s,
    }


@torch.no_grad()
def show_text_vae(instance, data: SentenceDataset, ev: dict, seed: int) -> dict:
    """Greedy decodes of prior samples and of interpolations between two sentences' posterior means."""
    from ppl_models.text_vae import generate

    decoder = instance.modules["decoder"]
    encoder = instance.modules["encoder"]
    vocab = data.vocab
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(ev["num_prior_samples"], decoder.z_dim, generator=gen)
    prior = [" ".join(vocab.decode(s)) for s in generate(decoder, z)]
    # two sentences of 8 to 15 words (if there are two), drawn with the seed
    candidates = [i for i in range(data.num_data) if 9 <= len(data.sequences[i]) <= 16]
    if len(candidates) < 2:
        candidates = list(range(data.num_data))
    order = torch.randperm(len(candidates), generator=gen)[:2].tolist()
    pair = [candidates[i] for i in order]
    tokens, lengths = data.batch(torch.tensor(pair))
    z_loc, _ = encoder(tokens, lengths)
    steps = torch.linspace(0, 1, ev["interpolation_steps"])[:, None]
    path = (1 - steps) * z_loc[0] + steps * z_loc[1]
    interp = [" ".join(vocab.decode(s)) for s in generate(decoder, path)]
    ends = [" ".join(vocab.decode(data.sequences[i])) for i in pair]
    _log("samples from the prior (greedy decoding):")
    for s in prior:
        _log(f"  {s}")
    _log(f"interpolation between the posterior means of\n  A: {ends[0]}\n  B: {ends[1]}")
    for a, s in zip(steps[:, 0].tolist(), interp):
        _log(f"  {a:.2f}  {s}")
    return {"prior_samples": prior, "interpolation": {"from": ends[0], "to": ends[1], "decoded": interp}}


# ------------------------------------------------------------------------------------------------ one run
def run(config: dict, run_dir: Path | None = None, resume: bool = False) -> dict:
    run_dir = Path(run_dir or config["output"]["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    d, t, ev = config["data"], config["train"], config["evaluate"]
    splits = ptb_splits(d["data_dir"] or None, max_len=d["max_len"])
    train = splits["train"].head(d["limit_train"]) if d["limit_train"] > 0 else splits["train"]
    vocab = train.vocab
    model_cfg, guide_cfg = dict(config["model"]), dict(config["guide"])
    model_name, guide_name = model_cfg.pop("name"), guide_cfg.pop("name", "empty")
    pyro.clear_param_store()
    pyro.set_rng_seed(t["seed"])
    instance = registry.instantiate(
        model_name, guide_name, num_data=train.num_data,
        model_kwargs={"vocab_size": len(vocab), "max_len": d["max_len"], **model_cfg}, guide_kwargs=guide_cfg,
    )
    num_params = sum(p.numel() for p in instance.modules.parameters())
    _log(f"{config['label']}: model {model_name}, guide {guide_name}, {num_params:,} parameters, "
         f"{train.num_data} training sentences ({train.num_tokens} tokens), torch threads {torch.get_num_threads()}")
    started = time.perf_counter()
    if model_name == "bigram":
        transitions = instance.modules["transitions"]
        transitions.fit(train.sequences)
        scores = transitions.choose_alpha(splits["valid"].sequences)
        alpha = float(transitions.alpha)
        _log(f"bigram: alpha = {alpha:g} (validation log-likelihood {scores[alpha]:.1f})")
        training = {"steps": 0, "epochs": 1.0, "train_seconds": time.perf_counter() - started, "log": [],
                    "alpha": alpha}
    else:
        probe = random_subset(splits["valid"], 64, ev["subset_seed"])
        training = train_neural(instance, train, probe, config, run_dir, resume)
    instance.modules.eval()
    latent = has_latents(instance)
    test = random_subset(splits["test"], ev["test_subset"], ev["subset_seed"])
    results = {"label": config["label"], "model": model_name, "guide": guide_name, "num_parameters": num_params,
               "torch_threads": torch.get_num_threads(), "config": config, "training": training}
    results["test"] = score(instance, test, ev["num_samples"] if latent else 1, ev, t["seed"])
    _log(f"test ({test.num_data} sentences, {test.num_tokens} tokens, K={results['test']['num_samples']}): "
         f"NLL {results['test']['nll']:.2f} ± {results['test']['nll_se']:.2f} nats/sentence, "
         f"KL {results['test']['kl']:.2f}, PPL {results['test']['ppl']:.1f} ({results['test']['eval_seconds']:.0f} s)")
    if not latent and ev["full_test"] and test.num_data < splits["test"].num_data:
        results["test_full"] = score(instance, splits["test"], 1, ev, t["seed"])
        _log(f"whole test set ({splits['test'].num_data} sentences): PPL {results['test_full']['ppl']:.1f}")
    if latent and ev["big_k_sentences"] > 0 and ev["big_num_samples"] > 0:
        few = random_subset(test, ev["big_k_sentences"], ev["subset_seed"] + 1)
        results["big_k"] = {"small": score(instance, few, ev["num_samples"], ev, t["seed"]),
                            "big": score(instance, few, ev["big_num_samples"], ev, t["seed"])}
        s, b = results["big_k"]["small"], results["big_k"]["big"]
        _log(f"{few.num_data} test sentences: NLL with K={s['num_samples']}: {s['nll']:.3f}, "
             f"K={b['num_samples']}: {b['nll']:.3f} ({b['eval_seconds']:.0f} s)")
    if model_name == "text-vae" and ev["num_prior_samples"] > 0:
        results["text"] = show_text_vae(instance, test, ev, t["seed"])
    results["wall_seconds"] = time.perf_counter() - started
    text = json.dumps(results, indent=1) + "\n"
    atomic_write_bytes(run_dir / "results.json", lambda f: f.write(text.encode()))
    _log(f"wrote {run_dir / 'results.json'}  (wall {results['wall_seconds']:.0f} s)")
    return results


# ------------------------------------------------------------------------------------------------ table
def table(results) -> str:
    """A markdown table of runs' results (``results.json`` contents)."""
    lines = ["| model | test NLL (nats/sent.) | KL | PPL | K | sentences | train steps | train s | eval s | total s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        te = r["test"]
        lines.append(
            f"| {r['label']} | {te['nll']:.2f} ± {te['nll_se']:.2f} | {te['kl']:.2f} | {te['ppl']:.1f} | "
            f"{te['num_samples']} | {te['num_sentences']} | {r['training']['steps']} | "
            f"{r['training']['train_seconds']:.0f} | {te['eval_seconds']:.0f} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def read_results(run_dirs) -> list:
    out = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            print(f"note: {path} does not exist (run not finished?); skipped", file=sys.stderr)
            continue
        out.append(json.loads(path.read_text()))
    return out


def main(args):
    if args.table:
        text = table(read_results(args.table))
        print(text)
        return text
    if not args.config:
        raise ConfigError("give --config CONFIG.toml (examples/configs/ptb_*.toml) or --table RUN_DIR ...")
    config = load_run_config(args.config, args.overrides)
    if args.label:
        config["label"] = args.label
    results = run(config, args.run_dir, resume=args.resume)
    print(table([results]))
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIGS / "ptb_lstm_lm.toml"), help="run TOML (default: %(default)s)")
    parser.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key, e.g. -o train.time_limit=60 (repeatable; the value is read as "
                             "TOML, as by ppl-models fit)")
    parser.add_argument("--run-dir", default=None, help="default: the config's [output].run_dir")
    parser.add_argument("--label", default=None, help="the run's name in the table (default: the config's label)")
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's newest checkpoint")
    parser.add_argument("--table", nargs="+", metavar="RUN_DIR", help="print the table of finished runs and exit")
    return parser.parse_args(argv)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    sys.exit(report_errors(main)(parse_args()))
