r"""IBM Model 1 as an aligner: fit it by EM on tokenized text, then read links off its exact posterior.

.. code-block:: python

    from ppl_models.tasks import ibm1, aer
    e2f = ibm1.fit_ibm1(english, french, num_iterations=10)       # English source, French generated
    f2e = ibm1.fit_ibm1(french, english, num_iterations=10)
    fwd = ibm1.align(e2f, english, french)                         # {(english i, french j)}, 0-based
    bwd = [aer.transpose(s) for s in ibm1.align(f2e, french, english)]
    sym = aer.symmetrize(fwd, bwd, "grow-diag-final")
    aer.score(sym, aer.read_gold(path))

* :func:`fit_ibm1` — vocabularies of every training word (source index 0 = NULL), the sparse table over the
  co-occurring pairs, ``num_iterations`` EM iterations by :func:`ppl_models.infer.em.fit_em` from uniform rows.
* :func:`link_posteriors` — :math:`p(a_j = i \mid e, f)`, one ``(m, l + 1)`` tensor per pair (column 0: NULL).
* :func:`viterbi_links` — each target word linked to its most probable source position, none when that is NULL
  (ties go to NULL, then to the leftmost word); :func:`threshold_links` — every link with posterior above a
  threshold (a word may get none, or several below 0.5).  :func:`align` does both from text.

Input words unseen in training map to ``<unk>``; a pair involving one has :math:`t = 0`, so an unseen target word
stays unaligned and an unseen source word gets no link (:func:`unknown_counts` reports how many).

Pass text already normalized as in training (e.g. both lowercased: :func:`ppl_models.data.hansards.hansards_text`
lowercases by default, Multi30k's ``lc.norm.tok`` files are lowercase).

**As a model of the package** (``ppl-models fit`` with ``[model] name = "ibm1"``, then ``ppl-models align``): the
task interface (:mod:`ppl_models.tasks`) trains it by exact EM instead of the SVI engine — :func:`make_trainer`
gives :class:`EMTrainer`, ``[train] num_epochs`` EM iterations (one E-step over the training split each) from
uniform rows, then one checkpoint holding the table; :func:`resolve_config` sets the guide ``enumerate``;
:func:`evaluate` reports the exact log-likelihood of a split; :func:`write_run_files` saves the vocabularies
(``vocab.json``) and :func:`load_aligner` reads a run back as an :class:`IBM1Aligner` without the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Set, Tuple

import torch

from ppl_models.atomic import atomic_write_bytes
from ppl_models.data.text import Vocab
from ppl_models.ibm1 import IBM1Corpus, IBM1Params
from ppl_models.infer.checkpoint import (
    CheckpointError,
    capture_rng_state,
    newest_readable_checkpoint,
    save_checkpoint,
)
from ppl_models.infer.em import EMResult, fit_em
from ppl_models.infer.engine import FitResult
from ppl_models.tasks.aer import Link
from ppl_models.tasks.alignment import read_run_vocab, write_run_files

__all__ = [
    "LINK_METHODS",
    "IBM1Aligner",
    "fit_ibm1",
    "check_text",
    "encode_corpus",
    "encode_pairs",
    "unknown_counts",
    "link_posteriors",
    "viterbi_links",
    "threshold_links",
    "align",
    "sentence_lengths",
    "EMTrainer",
    "resolve_config",
    "make_trainer",
    "evaluate",
    "evaluate_em",
    "corpus_pairs",
    "load_em_tables",
    "write_run_files",
    "load_aligner",
]

LINK_METHODS = ("viterbi", "threshold")


@dataclass
class IBM1Aligner:
    """A fitted IBM Model 1 and the vocabularies of its training text.

    :ivar params: the translation table.
    :ivar src_vocab: source words (index 0, ``<pad>``, is NULL).
    :ivar tgt_vocab: target words.
    :ivar em: the EM log-likelihood trace (mean per sentence pair).
    :ivar lower: the training text was lowercased (``ppl-models align`` lowercases its input then).
    """

    params: IBM1Params
    src_vocab: Vocab
    tgt_vocab: Vocab
    em: EMResult
    lower: bool = True
    name: str = "ibm1"
    title = "IBM Model 1"  # in messages (a class attribute, not a field)

    def links(self, src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]], method: str = "posterior",
              threshold: Optional[float] = None, bar=None) -> List[Set[Link]]:
        """The aligner interface of :func:`ppl_models.tasks.alignment.align_text`: ``"posterior"`` — Viterbi links
        (:func:`viterbi_links`; with ``threshold``, only those whose posterior is above it), ``"threshold"`` —
        :func:`threshold_links` (default 0.5)."""
        if method not in ("posterior", "threshold"):
            raise ValueError(f"align: {self.title} links by 'posterior' (the argmax, NULL = unaligned) or "
                             f"'threshold', received {method!r} (it has no inference network q)")
        if threshold is not None and not 0.0 <= threshold < 1.0:
            raise ValueError(f"align: --threshold: expected a probability in [0, 1), received {threshold!r}")
        post = self.posteriors(src, tgt)
        if method == "threshold":
            out = threshold_links(post, 0.5 if threshold is None else threshold)
        else:
            out = viterbi_links(post)
            if threshold is not None:
                out = [{(i, j) for i, j in links if float(p[j, i + 1]) > threshold} for links, p in zip(out, post)]
        if bar is not None:
            bar.update(len(src))
        return out

    def posteriors(self, src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]]) -> List[torch.Tensor]:
        """:func:`link_posteriors` of the pairs."""
        return link_posteriors(self, src, tgt)


def check_text(what: str, src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]]) -> None:
    if len(src) != len(tgt):
        raise ValueError(f"{what}: expected as many source as target sentences, received {len(src)} and {len(tgt)}")
    for n, (s, t) in enumerate(zip(src, tgt)):
        if not s or not t:
            side = "source" if not s else "target"
            raise ValueError(f"{what}: sentence pair {n}: expected a non-empty {side} sentence, received none")


def fit_ibm1(src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]], *, num_iterations: int = 10,
             tol: float = 0.0, dtype: torch.dtype = torch.float64, progress: bool = False) -> IBM1Aligner:
    """IBM Model 1 with NULL, :math:`t(f \\mid e)` for ``src`` words :math:`e` generating ``tgt`` words :math:`f`,
    fitted by ``num_iterations`` EM iterations (fewer if the mean log-likelihood changes by less than ``tol``).

    :param src: tokenized source sentences (the conditioning side).
    :param tgt: tokenized target sentences, one per source sentence (the generated side).
    """
    check_text("fit_ibm1", src, tgt)
    src_vocab, tgt_vocab = Vocab.build(src), Vocab.build(tgt)
    corpus = encode_pairs(src_vocab, tgt_vocab, src, tgt)
    params = IBM1Params(len(src_vocab), len(tgt_vocab), dtype=dtype).init_from_corpus(corpus)
    result = fit_em(params, corpus, num_iterations=num_iterations, tol=tol, progress=progress)
    return IBM1Aligner(params, src_vocab, tgt_vocab, result)


def encode_corpus(aligner: IBM1Aligner, src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]]) -> IBM1Corpus:
    """The pairs in the aligner's vocabularies (unseen words: ``<unk>``)."""
    check_text("encode_corpus", src, tgt)
    return encode_pairs(aligner.src_vocab, aligner.tgt_vocab, src, tgt)


def encode_pairs(src_vocab: Vocab, tgt_vocab: Vocab, src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]],
                 corpus_cls=IBM1Corpus):
    """Tokenized pairs in these vocabularies (unseen words: ``<unk>``) as an EM corpus, ``corpus_cls`` (an
    :class:`IBM1Corpus`, or e.g. the HMM's :class:`~ppl_models.hmm_align.HMMCorpus`)."""
    return corpus_cls([src_vocab.encode(s) for s in src], [tgt_vocab.encode(t) for t in tgt], len(src_vocab),
                      len(tgt_vocab))


def unknown_counts(aligner: IBM1Aligner, src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]]) -> dict:
    """Tokens of ``src``/``tgt`` not in the training vocabularies, and the totals."""
    return {
        "src_unknown": sum(w not in aligner.src_vocab for s in src for w in s),
        "src_tokens": sum(len(s) for s in src),
        "tgt_unknown": sum(w not in aligner.tgt_vocab for t in tgt for w in t),
        "tgt_tokens": sum(len(t) for t in tgt),
    }


def link_posteriors(aligner: IBM1Aligner, src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]]
                    ) -> List[torch.Tensor]:
    r""":math:`p(a_j = i \mid e, f)` per pair: a ``(m, l + 1)`` tensor, column 0 NULL, column ``i`` source word
    ``i - 1`` (0-based)."""
    corpus = encode_corpus(aligner, src, tgt)
    return corpus.split_pairs(aligner.params.pair_posteriors(corpus))


def viterbi_links(posteriors: Sequence[torch.Tensor]) -> List[Set[Link]]:
    """``{(i, j)}`` 0-based (source ``i``, target ``j``): each target word's most probable source position; none if
    it is NULL or the word's posterior is all zero."""
    out = []
    for post in posteriors:
        best = post.argmax(-1)  # first maximum: NULL wins ties
        keep = (best > 0) & (post.max(-1).values > 0)
        out.append({(int(i) - 1, int(j)) for j, i in zip(keep.nonzero().flatten().tolist(), best[keep].tolist())})
    return out


def threshold_links(posteriors: Sequence[torch.Tensor], threshold: float = 0.5) -> List[Set[Link]]:
    """``{(i, j)}``: every non-NULL source position ``i`` with :math:`p(a_j = i + 1 \\mid e, f) >` ``threshold``."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold_links: expected a threshold in [0, 1), received {threshold!r}")
    out = []
    for post in posteriors:
        j, i = (post[:, 1:] > threshold).nonzero(as_tuple=True)
        out.append(set(zip(i.tolist(), j.tolist())))
    return out


def align(aligner: IBM1Aligner, src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]], *,
          method: str = "viterbi", threshold: float = 0.5) -> List[Set[Link]]:
    """Links of each pair, 0-based ``(source i, target j)``, by ``method`` (``"viterbi"`` or ``"threshold"``)."""
    if method not in LINK_METHODS:
        raise ValueError(f"align: method must be one of {', '.join(LINK_METHODS)}, received {method!r}")
    post = link_posteriors(aligner, src, tgt)
    return viterbi_links(post) if method == "viterbi" else threshold_links(post, threshold)


def sentence_lengths(src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]]) -> List[Tuple[int, int]]:
    """``(len(src_n), len(tgt_n))`` per pair (for :func:`ppl_models.tasks.aer.symmetrize`)."""
    return [(len(s), len(t)) for s, t in zip(src, tgt)]


# ---------------------------------------------------------------------------------------------------------
# The task interface: ppl-models fit / evaluate / align for model "ibm1"
# ---------------------------------------------------------------------------------------------------------


def resolve_config(config):
    """IBM Model 1 trains by exact EM (:class:`EMTrainer`): the guide is ``enumerate`` (set when unset; the exact
    log-likelihood), and there is no ``[train] strategy``."""
    if config.train.strategy is not None:
        raise ValueError(f"model 'ibm1' trains by exact EM; it takes no [train].strategy, received "
                         f"{config.train.strategy!r}")
    if config.guide.name not in (None, "enumerate", "exact"):
        raise ValueError(f"model 'ibm1': [guide].name must be 'enumerate' or 'exact', received {config.guide.name!r}")
    return dataclasses.replace(config, guide=dataclasses.replace(config.guide, name=config.guide.name or "enumerate"))


def corpus_pairs(dataset) -> Tuple[list, list]:
    """The source and target sentences (index lists, the targets without their ``<eos>``) of a
    :class:`~ppl_models.data.parallel.ParallelText` or of its first rows (``[data] limit_*``)."""
    if hasattr(dataset, "base") and not hasattr(dataset, "src"):
        dataset = dataset.base.head(dataset.num_data)
    return dataset.src, [t[:-1] for t in dataset.tgt]


def _corpus(dataset, src_vocab_size: int, tgt_vocab_size: int) -> IBM1Corpus:
    """A data set's pairs (:func:`corpus_pairs`) as an :class:`IBM1Corpus`."""
    return IBM1Corpus(*corpus_pairs(dataset), src_vocab_size, tgt_vocab_size)


class EMTrainer:
    """Exact EM for a ``"ibm1"`` run (the task's :func:`make_trainer`): the engine trainer's interface
    (``fit``, ``resume``, ``load_state_dict``) for :class:`ppl_models.app.experiment.Experiment`.

    ``[train] num_epochs`` EM iterations over the training split, from uniform rows (:meth:`IBM1Params.
    init_from_corpus`), by :func:`ppl_models.infer.em.fit_em`; then one checkpoint ``step-<iterations>.pt`` holding
    the table (``state["tables"]["params"]``) and the log-likelihood trace (``history``: ``train_elbo`` is the exact
    mean log-likelihood per sentence pair after each iteration).  A resumed run continues from the checkpoint's
    table for the iterations left.  The other ``[train]`` settings (optimizer, batches, validation) do not apply.
    Another EM-fitted alignment model sets ``model_name`` and ``make_corpus`` (the HMM's
    :class:`~ppl_models.tasks.hmm_align.HMMEMTrainer`); its parameters' ``init_from_corpus`` starts them.
    """

    parallel = None
    model_name = "ibm1"

    def __init__(self, experiment, splits: dict, instance, *, run_dir=None, progress: Optional[bool] = None,
                 setup_start: Optional[float] = None, **ignored):
        self.params = instance.modules["params"]
        self.train = splits["train"]
        self.num_iterations = experiment.config.train.num_epochs
        self.keep_last = experiment.config.train.keep_last
        self.run_dir = Path(experiment.run_dir if run_dir is None else run_dir)
        self.progress = experiment.config.train.progress if progress is None else progress
        self.setup_start = setup_start
        self.step = 0
        self.history = {"epoch": [], "step": [], "train_elbo": [], "valid_elbo": [], "epoch_time": []}
        self._written: List[str] = []
        self._corpus: Optional[IBM1Corpus] = None

    def _setup(self):
        """The training corpus (built once; data that do not fit the table's vocabularies fail here)."""
        if self._corpus is None:
            self._corpus = self.make_corpus(self.train, self.params.src_vocab_size, self.params.tgt_vocab_size)
        return self._corpus

    @staticmethod
    def make_corpus(dataset, src_vocab_size: int, tgt_vocab_size: int):
        """The EM corpus of a split (:class:`IBM1Corpus`)."""
        return _corpus(dataset, src_vocab_size, tgt_vocab_size)

    def state_dict(self) -> dict:
        """The checkpoint: the table (``tables``), the step (= iterations) and history, in the engine's checkpoint
        format (:data:`ppl_models.infer.checkpoint.REQUIRED_KEYS`), its optimizer and batch keys empty: EM has
        neither, and it draws no random numbers."""
        return {"settings": {"model": self.model_name, "num_data": int(self.train.num_data)}, "step": self.step,
                "epoch": self.step, "batch_in_epoch": 0, "params": {}, "optimizer": {}, "rng": capture_rng_state(),
                "generator": torch.Generator().get_state(), "perm": torch.zeros(0, dtype=torch.long),
                "partial": [0.0, 0, 0.0, 0], "history": self.history, "tables": {"params": self.params.state_dict()},
                "checkpoints": list(self._written)}

    def load_state_dict(self, state: dict) -> None:
        if "tables" not in state:
            raise CheckpointError(f"cannot load: the checkpoint holds no {self.model_name} table (state['tables'])")
        self.params.load_state_dict(state["tables"]["params"])
        self.step, self.history = int(state["step"]), state["history"]
        self._written = list(state.get("checkpoints", []))

    def use_best(self) -> None:
        """The engine trainer's interface: EM selects no parameters by validation, so there is none to restore."""
        return None

    def resume(self) -> Optional[Path]:
        path, state = newest_readable_checkpoint(self.run_dir / "checkpoints", report=True)
        if path is not None:
            self.load_state_dict(state)
        return path

    def fit(self, resume: bool = False) -> FitResult:
        start = time.perf_counter()
        corpus = self._setup()
        if self.step == 0:
            self.params.init_from_corpus(corpus)
        train_start = time.perf_counter()
        left = max(0, self.num_iterations - self.step)
        result = fit_em(self.params, corpus, num_iterations=left, tol=0.0, progress=self.progress)
        seconds = time.perf_counter() - train_start
        for n, value in enumerate(result.log_likelihood[1:], self.step + 1):
            for key, v in (("epoch", n), ("step", n), ("train_elbo", value), ("valid_elbo", math.nan),
                           ("epoch_time", seconds / max(1, result.num_iterations))):
                self.history[key].append(v)
        self.step += result.num_iterations
        path = None
        if result.num_iterations or not self._written:
            path, self._written = save_checkpoint(self.run_dir / "checkpoints", self.state_dict(),
                                                  keep_last=self.keep_last)
            text = json.dumps(self.history, indent=1).encode()
            atomic_write_bytes(self.run_dir / "history.json", lambda f: f.write(text))
        if self.progress and result.log_likelihood:
            print(f"EM: {result.num_iterations} iterations, mean log-likelihood per pair "
                  f"{result.log_likelihood[0]:.3f} -> {result.log_likelihood[-1]:.3f}", file=sys.stderr)
        setup = train_start - (start if self.setup_start is None else self.setup_start)
        return FitResult(self.history, self.step, self.step, time.perf_counter() - start,
                         path or (self.run_dir / "checkpoints" / self._written[-1]), setup_seconds=setup,
                         train_seconds=seconds, fast_path="off: exact EM")


def make_trainer(experiment, splits: dict, instance, **overrides) -> EMTrainer:
    """The task's trainer (:mod:`ppl_models.tasks`): :class:`EMTrainer`."""
    return EMTrainer(experiment, splits, instance, **overrides)


def evaluate(experiment, instance, dataset, split: str):
    r"""The exact log-likelihood :math:`\log p(f \mid e)` of the split's pairs (:func:`evaluate_em`)."""
    return evaluate_em(EMTrainer, instance, dataset, split)


def evaluate_em(trainer_cls, instance, dataset, split: str):
    r"""The exact log-likelihood :math:`\log p(f \mid e)` of the split's pairs under an EM-fitted alignment model
    (``trainer_cls``: its :class:`EMTrainer`, for the corpus and the name) — no ``<eos>``; words unseen in training
    are ``<unk>``: a target word none of whose source words (nor NULL) co-occurred with it in training has
    :math:`t = 0`, so its sentence is counted apart (``sentences_with_zero_probability``) and the perplexity is over
    the others."""
    from ppl_models.tasks.alignment import AlignmentEval

    start = time.perf_counter()
    params = instance.modules["params"]
    corpus = trainer_cls.make_corpus(dataset, params.src_vocab_size, params.tgt_vocab_size)
    log_lik = params.log_likelihood(corpus)
    finite = torch.isfinite(log_lik)
    tokens = int(corpus.tgt_lengths[finite].sum())
    nll = -float(log_lik[finite].sum()) / max(1, tokens)
    return AlignmentEval({
        "model": trainer_cls.model_name, "split": split, "num_data": corpus.num_data,
        "num_tokens": int(corpus.tgt_lengths.sum()), "sentences_with_zero_probability": int((~finite).sum()),
        "nll_per_token": nll, "perplexity": math.exp(nll) if tokens else math.nan, "table_entries": params.num_entries,
        "likelihood": "exact: sum over alignments, sentences with a zero-probability word left out",
        "wall_time_s": time.perf_counter() - start})


def load_aligner(experiment, **ignored) -> IBM1Aligner:
    """A trained ``"ibm1"`` run (``Experiment.from_run_dir``) as an :class:`IBM1Aligner`: its vocabularies
    (``vocab.json``) and the newest readable checkpoint's table; no training data is loaded."""
    if experiment.config.model.name != "ibm1":
        raise ValueError(f"{experiment.run_dir} holds a {experiment.config.model.name!r} run, not 'ibm1'")
    src_vocab, tgt_vocab, lower = read_run_vocab(experiment)
    dtype = {"float64": torch.float64, "float32": torch.float32}[experiment.config.model.hparams.get("dtype", "float64")]
    params = IBM1Params(len(src_vocab), len(tgt_vocab), dtype=dtype)
    return IBM1Aligner(params, src_vocab, tgt_vocab, load_em_tables(experiment, params), lower=lower)


def load_em_tables(experiment, params) -> EMResult:
    """Load the newest readable checkpoint of an EM run (:class:`EMTrainer`) into ``params``; its EM trace."""
    path, state = newest_readable_checkpoint(Path(experiment.run_dir) / "checkpoints", report=True)
    if path is None:
        raise CheckpointError(f"{Path(experiment.run_dir) / 'checkpoints'} holds no readable checkpoint")
    if "tables" not in state:
        raise CheckpointError(f"{path}: holds no {experiment.config.model.name} table (state['tables'])")
    params.load_state_dict(state["tables"]["params"])
    trace = [float(v) for v in state["history"].get("train_elbo", [])]
    return EMResult(trace, len(trace))
