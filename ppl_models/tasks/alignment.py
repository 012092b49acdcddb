r"""What the latent-alignment task needs beyond its model (:mod:`ppl_models.alignment`): exact evaluation, alignment
output, translation, heatmaps, and the model's task interface (:mod:`ppl_models.tasks`).

* :func:`evaluate_alignment` — perplexity with the exact :math:`p(y \mid x)`, the variant's own objective computed
  exactly, alignment accuracy against gold alignments (:class:`AlignmentEval`);
* :class:`TrainedAligner` (:func:`load_aligner`), :func:`align_text` — a trained run as a word aligner
  (``ppl-models align``): links from the posterior, ``q`` or the prior, a posterior threshold (a word may stay
  unaligned), both directions and their symmetrization, AER against gold; the run's vocabularies and text
  normalization come from its ``vocab.json`` (:func:`write_run_files`), never from reloading the corpus;
* translation of a split and its corpus BLEU (:mod:`ppl_models.tasks.translation`);
* :func:`plot_alignments` — prior, posterior and ``q`` heatmaps of a few sentence pairs;
* the task interface: :func:`resolve_config` (the variant fixes ``[train].elbo`` and the guide),
  :func:`validation_loss` (validation by the exact log-likelihood), :func:`write_run_files` (the vocabularies)
  and :func:`evaluate` (the above, instead of importance sampling).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Set

import torch

from ppl_models.alignment import SAMPLED_VARIANTS, VARIANTS, AlignmentNet, States, log_marginal
from ppl_models.atomic import atomic_write_bytes
from ppl_models.data.text import TextDataError, Vocab, check_length, pad_batch
from ppl_models.infer.checkpoint import CheckpointError, newest_readable_checkpoint
from ppl_models.tasks import aer
from ppl_models.tasks.translation import translate_split

__all__ = [
    "LINK_METHODS",
    "VOCAB_FILE",
    "AlignmentEval",
    "evaluate_alignment",
    "TrainedAligner",
    "AlignedText",
    "align_text",
    "plot_alignments",
    "resolve_config",
    "validation_loss",
    "write_run_files",
    "read_run_vocab",
    "load_run_params",
    "evaluate",
    "load_aligner",
]


# ---------------------------------------------------------------------------------------------------------- evaluation


def _eval_batches(dataset, batch_size: int):
    """Index batches of similar lengths, in a fixed order (evaluation needs no shuffling)."""
    order = sorted(range(dataset.num_data), key=lambda i: (len(dataset.src[i]), len(dataset.tgt[i])))
    for start in range(0, len(order), batch_size):
        yield torch.tensor(order[start : start + batch_size])


def _guide_q_logits(guide_modules: dict, states: States, tgt, tgt_lengths):
    inference = guide_modules.get("inference") if guide_modules else None
    if inference is None:
        return None
    return inference(states.memory, states.src_mask, tgt, tgt_lengths)[0]


@dataclass
class AlignmentEval:
    """Evaluation of a latent-alignment model on one split (see :func:`evaluate_alignment`)."""

    metrics: dict

    def to_metrics(self) -> dict:
        return dict(self.metrics)

    def save(self, run_dir) -> None:
        text = json.dumps(self.metrics, indent=1).encode()
        atomic_write_bytes(Path(run_dir) / "metrics.json", lambda f: f.write(text))


@torch.no_grad()
def evaluate_alignment(net: AlignmentNet, dataset, *, guide_modules: Optional[dict] = None, batch_size: int = 64,
                       split: str = "test") -> AlignmentEval:
    r"""Exact evaluation on a :class:`~ppl_models.data.parallel.ParallelText` (no sampling anywhere).

    * ``nll_per_token`` and ``perplexity`` :math:`= \exp(-\sum \log p(y \mid x) / \#\text{tokens})`, tokens
      including one ``<eos>`` per sentence, with the exact :math:`p(y \mid x)` of the variant (:func:`log_marginal`);
    * ``elbo_per_token`` — the variant's own training objective computed exactly: soft and exact: the
      log-likelihood; hard: :math:`\sum_t \mathbb E_{p(z_t)}[\log p(y_t \mid z_t)]`; variational*:
      :math:`\sum_t \mathbb E_{q}[\log p(y_t, z_t) - \log q(z_t)]`;
    * with gold alignments (``dataset.alignments``): ``align_accuracy_posterior`` (argmax of
      :math:`p(z_t \mid x, y)`), ``align_accuracy_prior`` (argmax of :math:`p(z_t \mid x, y_{<t})`) and, with an
      inference network, ``align_accuracy_guide`` (argmax of :math:`q`), over target tokens (``<eos>`` excluded).
    """
    was_training = net.training
    net.eval()
    if guide_modules:
        for m in guide_modules.values():
            m.eval()
    start = time.perf_counter()
    total_ll, total_elbo, total_soft, tokens = 0.0, 0.0, 0.0, 0
    soft_baseline = net.variant in SAMPLED_VARIANTS and net.baseline == "soft"
    ll_sent = []
    correct = {"posterior": 0, "prior": 0, "guide": 0}
    gold_total = 0
    for idx in _eval_batches(dataset, batch_size):
        src, src_lengths, tgt, tgt_lengths = dataset.batch(idx)
        out = log_marginal(net, src, src_lengths, tgt, tgt_lengths)
        mask = out["mask"]
        ll = out["log_lik"].sum(-1)
        ll_sent += ll.tolist()
        total_ll += float(ll.sum())
        tokens += int(mask.sum())
        q_logits = _guide_q_logits(guide_modules, out["states"], tgt, tgt_lengths)
        prior, emission = out["log_prior"], out["log_emission"]
        if net.variant in ("soft", "exact"):
            elbo = out["log_lik"]
        elif net.variant == "hard":
            elbo = (prior.exp() * emission).sum(-1)
        elif q_logits is not None:
            elbo = (q_logits.exp() * (prior + emission - q_logits)).sum(-1)
        else:
            elbo = torch.full_like(out["log_lik"], float("nan"))
        total_elbo += float(elbo.masked_fill(~mask, 0.0).sum())
        if soft_baseline:
            total_soft += float(net.soft_log_lik(out["states"], tgt).masked_fill(~mask, 0.0).sum())
        if getattr(dataset, "alignments", None) is not None:
            guesses = {"posterior": out["log_posterior"].argmax(-1), "prior": prior.argmax(-1)}
            if q_logits is not None:
                guesses["guide"] = q_logits.argmax(-1)
            for row, i in enumerate(idx.tolist()):
                for src_pos, tgt_pos in dataset.alignments[i]:
                    gold_total += 1
                    for name, guess in guesses.items():
                        correct[name] += int(guess[row, tgt_pos]) == src_pos
    net.train(was_training)
    nll = -total_ll / tokens
    metrics = {
        "model": "alignment",
        "variant": net.variant,
        "split": split,
        "num_data": dataset.num_data,
        "num_tokens": tokens,
        "nll_per_token": nll,
        "perplexity": math.exp(nll),
        "nll_per_sentence": -total_ll / dataset.num_data,
        "elbo_per_token": total_elbo / tokens,
        "likelihood": "exact: soft's own softmax" if net.variant == "soft" else "exact: sum over alignments",
        "wall_time_s": time.perf_counter() - start,
    }
    if soft_baseline:  # the score-function baseline's own perplexity (the soft path trained jointly)
        metrics["soft_baseline_perplexity"] = math.exp(-total_soft / tokens)
    if gold_total:
        for name, count in correct.items():
            if name != "guide" or _has_inference(guide_modules):
                metrics[f"align_accuracy_{name}"] = count / gold_total
    return AlignmentEval(metrics)


def _has_inference(guide_modules) -> bool:
    return bool(guide_modules) and guide_modules.get("inference") is not None


# ------------------------------------------------------------------------------------------------------------ heatmaps
@torch.no_grad()
def plot_alignments(net: AlignmentNet, dataset, path, *, guide_modules: Optional[dict] = None, rows=(0, 1, 2),
                    title: str = ""):
    """PNG: for each sentence pair in ``rows``, the prior p(z_t | x, y_<t), the posterior p(z_t | x, y) and, with an
    inference network, q(z_t | x, y), side by side (target steps down, source positions across; grey scale from 0 to
    each panel's largest probability); tokens are shown with HTML entities (``&apos;`` in the Europarl/Hansards
    files) unescaped."""
    import html

    from ppl_models.tasks.plots import plt, save_figure

    rows = [r for r in rows if r < dataset.num_data]
    idx = torch.tensor(rows)
    src, src_lengths, tgt, tgt_lengths = dataset.batch(idx)
    net.eval()
    out = log_marginal(net, src, src_lengths, tgt, tgt_lengths)
    panels = [("prior p(z | x, y<t)", out["log_prior"]), ("posterior p(z | x, y)", out["log_posterior"])]
    q_logits = _guide_q_logits(guide_modules, out["states"], tgt, tgt_lengths)
    if q_logits is not None:
        panels.append(("inference network q(z | x, y)", q_logits))
    # constrained layout keeps each colorbar and its labels clear of the next panel's token labels
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.6 * len(panels), 3.8 * len(rows)), squeeze=False,
                             layout="constrained")
    for r, i in enumerate(rows):
        s_tok = [html.unescape(t) for t in dataset.src_vocab.decode(dataset.src[i], strip_specials=False)]
        t_tok = [html.unescape(t) for t in dataset.tgt_vocab.decode(dataset.tgt[i], strip_specials=False)]
        for c, (name, logits) in enumerate(panels):
            ax = axes[r][c]
            probs = logits[r, : len(t_tok), : len(s_tok)].exp().numpy()
            image = ax.imshow(probs, vmin=0, vmax=max(float(probs.max()), 1e-12), cmap="Greys", aspect="auto")
            ax.set_xticks(range(len(s_tok)), s_tok, rotation=90, fontsize=7)
            ax.set_yticks(range(len(t_tok)), t_tok, fontsize=7)
            if r == 0:
                ax.set_title(name, fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=6)
    fig.suptitle(title or f"alignments ({net.variant})")
    return save_figure(fig, path)


# -------------------------------------------------------------------------------------------------- the task interface
def resolve_config(config):
    """The variant fixes ``[train].elbo`` and the guide (:data:`~ppl_models.alignment.VARIANTS`).

    Left at their defaults (``Trace_ELBO``, no guide name) they are filled in; set to anything else they are an
    error (:class:`ValueError`) naming the right ones (``variational-enum`` also accepts the ``exact-posterior``
    guide).  ``[guide]`` ``emb_dim`` and ``hidden_dim`` size the inference network and are dropped for the variants
    without one, so one configuration serves all five.
    """
    variant = config.model.hparams.get("variant", "exact")
    if variant not in VARIANTS:
        raise ValueError(f"[model].variant: unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    elbo, guide = VARIANTS[variant]
    guides = (guide, "exact-posterior") if variant == "variational-enum" else (guide,)
    if config.train.elbo not in ("Trace_ELBO", elbo):
        raise ValueError(f"variant {variant!r} trains with [train].elbo = {elbo!r}, received {config.train.elbo!r}")
    if config.guide.name not in (None, *guides):
        raise ValueError(f"variant {variant!r} trains with [guide].name = {guide!r}, received {config.guide.name!r}")
    if config.train.strategy is not None:
        raise ValueError(f"the alignment model takes no [train].strategy, received {config.train.strategy!r}")
    train = dataclasses.replace(config.train, elbo=elbo)
    name = config.guide.name or guide
    hparams = dict(config.guide.hparams)
    if name != "inference-network":  # [guide] emb_dim / hidden_dim size the inference network only
        for key in ("emb_dim", "hidden_dim"):
            hparams.pop(key, None)
    guide_cfg = dataclasses.replace(config.guide, name=name, hparams=hparams)
    return dataclasses.replace(config, train=train, guide=guide_cfg)


def _guide_modules(instance) -> dict:
    return {k: m for k, m in instance.modules.items() if k != "net"}


def evaluate(experiment, instance, dataset, split: str) -> AlignmentEval:
    """:func:`evaluate_alignment`, plus the heatmap PNG and the translations with BLEU (:func:`translate_split`)."""
    net = instance.modules["net"]
    guide_modules = _guide_modules(instance)
    if hasattr(dataset, "base") and not hasattr(dataset, "src"):  # [data] limit_<split>: the first rows
        dataset = dataset.base.head(dataset.num_data)
    result = evaluate_alignment(net, dataset, guide_modules=guide_modules, split=split,
                                batch_size=experiment.config.evaluate.batch_size)
    run_dir = experiment.run_dir
    if experiment.config.output.plots:
        plot_alignments(net, dataset, run_dir / "alignments.png", guide_modules=guide_modules,
                        title=f"{net.variant}: {split} sentences 0-2")
    result.metrics.update(translate_split(net, dataset, run_dir / "translations.txt",
                                          progress=experiment.config.train.progress))
    return result


# ------------------------------------------------------------------------------------------ validation and run files
def validation_loss(instance):
    """The engine's validation score (:mod:`ppl_models.tasks`): the exact :math:`-\\log p(y \\mid x)` of a batch
    (:func:`log_marginal`; every variant's own likelihood, no sampling), summed over its sentences, in eval mode
    (no dropout), in chunks of 64 sentences of similar length."""
    net = instance.modules["net"]

    @torch.no_grad()
    def valid_loss(src, src_lengths, tgt, tgt_lengths, idx=None) -> float:
        was_training = net.training
        net.eval()
        total = 0.0
        try:
            for rows in torch.argsort(tgt_lengths).split(64):
                s_len, t_len = int(src_lengths[rows].max()), int(tgt_lengths[rows].max())
                out = log_marginal(net, src[rows, :s_len], src_lengths[rows], tgt[rows, :t_len], tgt_lengths[rows])
                total += float(out["log_lik"].sum())
        finally:
            net.train(was_training)
        return -total

    return valid_loss


#: The run directory's vocabularies and text normalization (:func:`write_run_files`).
VOCAB_FILE = "vocab.json"
_VOCAB_FORMAT = "ppl_models.vocab/1"


def write_run_files(run_dir, splits) -> Path:
    """``run_dir/vocab.json``: the training split's source and target vocabularies and whether its text was
    lowercased, so that ``ppl-models align`` encodes new text exactly as the run's training text was."""
    train = splits["train"]
    train = getattr(train, "base", train)  # [data] limit_train: the vocabularies are the full split's
    payload = {"format": _VOCAB_FORMAT, "src": train.src_vocab.to_dict(), "tgt": train.tgt_vocab.to_dict(),
               "lower": bool(getattr(train, "lower", False))}
    path = Path(run_dir) / VOCAB_FILE
    text = json.dumps(payload).encode()
    atomic_write_bytes(path, lambda f: f.write(text))
    return path


def read_run_vocab(experiment):
    """``(src_vocab, tgt_vocab, lower)`` of a run: its ``vocab.json``, or — for a run trained before it was
    written — the data set's, rebuilt by loading the configured corpus (with a note)."""
    path = Path(experiment.run_dir) / VOCAB_FILE
    if not path.is_file():
        print(f"note: {experiment.run_dir} has no {VOCAB_FILE}; rebuilding the vocabularies from its training data",
              file=sys.stderr)
        train = experiment.load_data()["train"]
        train = getattr(train, "base", train)
        return train.src_vocab, train.tgt_vocab, bool(getattr(train, "lower", False))
    payload = json.loads(path.read_text(encoding="utf-8"))
    if payload.get("format") != _VOCAB_FORMAT:
        raise CheckpointError(f"{path}: expected format {_VOCAB_FORMAT!r}, received {payload.get('format')!r}")
    return Vocab.from_dict(payload["src"]), Vocab.from_dict(payload["tgt"]), bool(payload["lower"])


def load_run_params(instance, state: dict, where) -> None:
    """Copy a checkpoint's parameters into the instance's modules: those of its best validation when the run
    stopped early (``state["best"]``, :class:`~ppl_models.infer.Trainer`'s ``early_stopping``), else
    ``state["params"]``; named ``<module>$$$<parameter>`` as Pyro's param store names them.  A missing or
    misshapen one is a :class:`CheckpointError`."""
    params = state["best"]["params"] if state.get("best") else state["params"]
    with torch.no_grad():
        for key, module in instance.modules.items():
            for name, p in module.named_parameters():
                value = params.get(f"{key}$$${name}")
                if value is None or value.shape != p.shape:
                    got = "missing" if value is None else f"shape {tuple(value.shape)}"
                    raise CheckpointError(f"{where}: parameter {key}$$${name} of shape {tuple(p.shape)}: {got}")
                p.copy_(value)


# ------------------------------------------------------------------------------------------- alignment output (align)
#: ``ppl-models align --links``: the argmax of the exact posterior p(z_t | x, y), of the inference network's
#: q(z_t | x, y) or of the prior p(z_t | x, y_<t) (for ``soft``: its attention weights), or every source position
#: whose posterior exceeds the threshold.
LINK_METHODS = ("posterior", "q", "prior", "threshold")


@dataclass
class TrainedAligner:
    """A trained latent-alignment run as a word aligner (:func:`load_aligner`).

    :ivar net: the model's network; ``guide_modules``: the guide's (the inference network of the variational
        variants).
    :ivar src_vocab, tgt_vocab: the run's vocabularies; ``lower``: its text was lowercased.
    """

    net: AlignmentNet
    guide_modules: dict
    src_vocab: Vocab
    tgt_vocab: Vocab
    lower: bool
    name: str = "alignment"
    batch_size: int = 64
    max_len: int = 200

    @torch.no_grad()
    def links(self, src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]], method: str = "posterior",
              threshold: Optional[float] = None, bar=None) -> List[Set[aer.Link]]:
        """``{(i, j)}`` per pair, 0-based (source word ``i``, target word ``j``; ``<eos>`` never linked), of already
        normalized tokens (unknown words: ``<unk>``).

        ``method`` (:data:`LINK_METHODS`): an argmax links each target word to one source word — unless
        ``threshold`` is given and that word's probability is not above it (the word stays unaligned, a NULL
        link); ``"threshold"`` links every source word whose posterior is above ``threshold`` (default 0.5).
        ``bar``: a progress bar advanced by one per pair.
        """
        if method not in LINK_METHODS:
            raise ValueError(f"align: --links must be one of {', '.join(LINK_METHODS)}, received {method!r}")
        if method == "q" and not _has_inference(self.guide_modules):
            raise ValueError(f"align: --links q: the {self.net.variant!r} variant has no inference network q(z | x, y)")
        if threshold is not None and not 0.0 <= threshold < 1.0:
            raise ValueError(f"align: --threshold: expected a probability in [0, 1), received {threshold!r}")
        if method == "threshold" and threshold is None:
            threshold = 0.5
        for n, (s, t) in enumerate(zip(src, tgt)):
            check_length(s, self.max_len, f"source sentence {n + 1}")
            check_length(t, self.max_len, f"target sentence {n + 1}")
        src_ids = [self.src_vocab.encode(s) for s in src]
        tgt_ids = [self.tgt_vocab.encode(t) + [self.tgt_vocab.eos_index] for t in tgt]
        was_training = self.net.training
        self.net.eval()
        out: List[Set[aer.Link]] = [set() for _ in src_ids]
        order = sorted(range(len(src_ids)), key=lambda n: (len(tgt_ids[n]), len(src_ids[n])))
        try:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                s_pad, s_len = pad_batch([src_ids[n] for n in rows])
                t_pad, t_len = pad_batch([tgt_ids[n] for n in rows])
                logits = self._link_logits(s_pad, s_len, t_pad, t_len, method)
                for r, n in enumerate(rows):
                    out[n] = _links_of(logits[r, : len(tgt[n]), : len(src[n])], method, threshold)
                if bar is not None:
                    bar.update(len(rows))
        finally:
            self.net.train(was_training)
        return out

    def _link_logits(self, src, src_lengths, tgt, tgt_lengths, method: str) -> torch.Tensor:
        out = log_marginal(self.net, src, src_lengths, tgt, tgt_lengths)
        if method == "q":
            return _guide_q_logits(self.guide_modules, out["states"], tgt, tgt_lengths)
        return out["log_prior"] if method == "prior" else out["log_posterior"]


def _links_of(logits: torch.Tensor, method: str, threshold: Optional[float]) -> Set[aer.Link]:
    """Links of one pair from its ``(m, l)`` log-probabilities (target words down, source words across)."""
    probs = logits.exp()
    if method == "threshold":
        j, i = (probs > threshold).nonzero(as_tuple=True)
        return set(zip(i.tolist(), j.tolist()))
    best, at = probs.max(-1)
    keep = best > threshold if threshold is not None else torch.ones_like(best, dtype=torch.bool)
    return {(int(at[j]), j) for j in keep.nonzero().flatten().tolist()}


def load_aligner(experiment, *, batch_size: int = 64, max_len: int = 200) -> TrainedAligner:
    """The trained alignment run of ``experiment`` (``Experiment.from_run_dir``) as a :class:`TrainedAligner`:
    vocabularies from its ``vocab.json`` (:func:`read_run_vocab`), the newest readable checkpoint's
    parameters; no training data is loaded."""
    if experiment.config.model.name != "alignment":
        raise ValueError(f"{experiment.run_dir} holds a {experiment.config.model.name!r} run, not an alignment model")
    experiment.resolve_model_hooks()
    src_vocab, tgt_vocab, lower = read_run_vocab(experiment)
    instance = experiment.build(1, {"src_vocab_size": len(src_vocab), "tgt_vocab_size": len(tgt_vocab)})
    path, state = newest_readable_checkpoint(Path(experiment.run_dir) / "checkpoints", report=True)
    if path is None:
        raise CheckpointError(f"{Path(experiment.run_dir) / 'checkpoints'} holds no readable checkpoint")
    load_run_params(instance, state, path)
    return TrainedAligner(instance.modules["net"], _guide_modules(instance), src_vocab, tgt_vocab, lower,
                          name=f"alignment ({instance.modules['net'].variant})", batch_size=batch_size,
                          max_len=max_len)


@dataclass
class AlignedText:
    """What :func:`align_text` returns: the link sets of each direction (``reverse`` already transposed into the
    forward orientation), the output (``links``: the symmetrization when there are two directions), and the
    unknown-token counts of each aligner's input (``unknown``: name -> counts)."""

    forward: List[Set[aer.Link]]
    reverse: Optional[List[Set[aer.Link]]]
    links: List[Set[aer.Link]]
    unknown: dict

    def scores(self, gold: Sequence[aer.GoldLinks], symmetrize: str = "") -> dict:
        """AER/precision/recall of each direction and of the output against ``gold`` (in the forward
        orientation)."""
        rows = {"forward": aer.score(self.forward, gold)}
        if self.reverse is not None:
            rows["reverse"] = aer.score(self.reverse, gold)
            rows[symmetrize or "symmetrized"] = aer.score(self.links, gold)
        return rows


def _normalize(sentences, lower: bool):
    return [[w.lower() for w in s] for s in sentences] if lower else [list(s) for s in sentences]


def _unknown(aligner, src, tgt) -> dict:
    return {"src_unknown": sum(w not in aligner.src_vocab for s in src for w in s),
            "src_tokens": sum(len(s) for s in src),
            "tgt_unknown": sum(w not in aligner.tgt_vocab for t in tgt for w in t),
            "tgt_tokens": sum(len(t) for t in tgt)}


def align_text(forward, src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]], *, reverse=None,
               links: str = "posterior", threshold: Optional[float] = None, symmetrize: str = "intersection",
               progress: bool = True) -> AlignedText:
    """Align tokenized pairs with a trained aligner (``forward``: source ``src`` -> target ``tgt``) and, with
    ``reverse`` (an aligner of the other direction, ``tgt`` -> ``src``), symmetrize both
    (:data:`ppl_models.tasks.aer.SYMMETRIZATIONS`).

    An aligner is any object with ``src_vocab``, ``tgt_vocab``, ``lower``, ``name`` and
    ``links(src, tgt, method, threshold, bar)`` (:class:`TrainedAligner`, :class:`ppl_models.tasks.ibm1.IBM1Aligner`);
    each gets the text normalized as its training text was (``lower``).  One progress bar over all pairs.
    """
    if len(src) != len(tgt):
        raise TextDataError(f"align: expected as many source as target sentences, received {len(src)} and {len(tgt)}")
    if symmetrize not in aer.SYMMETRIZATIONS:
        raise ValueError(f"align: --symmetrize must be one of {', '.join(aer.SYMMETRIZATIONS)}, received {symmetrize!r}")
    from tqdm.auto import tqdm

    directions = [(forward, src, tgt)] + ([(reverse, tgt, src)] if reverse is not None else [])
    unknown, found = {}, []
    with tqdm(total=len(src) * len(directions), desc="align", unit="pair", disable=not progress, leave=False) as bar:
        for n, (aligner, s, t) in enumerate(directions):
            s, t = _normalize(s, aligner.lower), _normalize(t, aligner.lower)
            unknown[f"{'forward' if n == 0 else 'reverse'}: {aligner.name}"] = _unknown(aligner, s, t)
            found.append(aligner.links(s, t, links, threshold, bar))
    if reverse is None:
        return AlignedText(found[0], None, found[0], unknown)
    backward = [aer.transpose(x) for x in found[1]]
    lengths = [(len(s), len(t)) for s, t in zip(src, tgt)]
    return AlignedText(found[0], backward, aer.symmetrize(found[0], backward, symmetrize, lengths), unknown)
